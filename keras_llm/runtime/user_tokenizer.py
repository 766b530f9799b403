"""Any tokenizer, seen by the engine as it sees a `HostTokenizer`.

The engine, the CLI and the servers ask a tokenizer for `encode`, `decode`,
`stream_decoder()`, `stop_ids`, `token_bytes`, `vocabulary_size`,
`max_token_bytes` and `apply_chat_template`. `TokenizerAdapter` gives those
to any object with `encode(text) -> ids` and `decode(ids) -> text` (a
Hugging Face `tokenizers.Tokenizer` from a `tokenizer.json` of any model
type: BPE, WordLevel, WordPiece, Unigram; a `transformers` tokenizer; a
user's own class). Streaming decodes the generated prefix and sends what it
adds, holding back a trailing U+FFFD (a character whose bytes are split
across tokens) until the next token completes it.

`load_tokenizer(path)` reads a `tokenizer.json` as what its content says it
is: keras-llm's own layout (`vocabulary` + `merges`) as a `HostTokenizer`,
Hugging Face's (`model`) through the `tokenizers` library.
"""

import json
import os

from keras_llm.runtime.tokenizer import (STOP_TOKEN_STRINGS, TOKENIZER_FILE, HostTokenizer,
                                         chat_prompt)

# Special tokens that end generation when a Hugging Face tokenizer has them.
HF_STOP_TOKENS = STOP_TOKEN_STRINGS + ("</s>", "<eos>", "<|eot_id|>", "<end_of_turn>")


class PrefixDecoder:
    """Streaming text by decoding the whole generated prefix each token.

    Args:
        decode: `ids -> text`.
    """

    def __init__(self, decode):
        self._decode = decode
        self._ids = []
        self._sent = ""

    def push(self, token_id):
        """Add one token; return the text it makes final."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids).rstrip("\ufffd")  # an incomplete character waits
        if not text.startswith(self._sent):  # the tokenizer rewrote earlier text: wait
            return ""
        delta, self._sent = text[len(self._sent):], text
        return delta

    def flush(self):
        """The text still held back (an incomplete tail as U+FFFD)."""
        text = self._decode(self._ids) if self._ids else ""
        delta = text[len(self._sent):] if text.startswith(self._sent) else ""
        self._ids, self._sent = [], ""
        return delta


def _ids(encoded):
    """Ids from what an `encode` returned: a list, an array, an `Encoding`
    (`tokenizers`) or a `BatchEncoding` (`transformers`)."""
    if hasattr(encoded, "ids"):
        encoded = encoded.ids
    elif isinstance(encoded, dict) and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(i) for i in (encoded.tolist() if hasattr(encoded, "tolist") else encoded)]


class TokenizerAdapter:
    """A user's tokenizer with the interface of `HostTokenizer`.

    Args:
        tokenizer: has `encode(text) -> ids` and `decode(ids) -> text`; its
            `eos_id`, `eos_token_id` or `stop_ids` (when present) end generation.
        vocabulary_size: ids it knows (default: from the tokenizer, else None).
        stop_ids: ids that end generation (default: as above; for a
            `tokenizers.Tokenizer`, its special tokens among `HF_STOP_TOKENS`).
        chat_template: a Jinja chat template (ChatML when None).

    Example:
        >>> tok = TokenizerAdapter(tokenizers.Tokenizer.from_file("tokenizer.json"))
        >>> tok.decode(tok.encode("hello world"))
        'hello world'
    """

    add_bos = False
    bos_id = None
    pad_id = None
    unk_id = None

    def __init__(self, tokenizer, vocabulary_size=None, stop_ids=None, chat_template=None):
        for method in ("encode", "decode"):
            if not callable(getattr(tokenizer, method, None)):
                raise TypeError(f"a tokenizer needs encode(text) -> ids and decode(ids) -> text; "
                                f"{type(tokenizer).__name__} has no {method}()")
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.vocabulary_size = vocabulary_size or self._vocabulary_size()
        specials = self._special_tokens()  # {text: id}
        self.special_token_ids = sorted(specials.values())
        eos = next((getattr(tokenizer, name) for name in ("eos_id", "eos_token_id")
                    if isinstance(getattr(tokenizer, name, None), int)), None)
        if eos is None:
            eos = next((specials[t] for t in HF_STOP_TOKENS if t in specials), None)
        self.eos_id = eos
        if stop_ids is None:
            stop_ids = getattr(tokenizer, "stop_ids", None)
        if stop_ids is None:
            stop_ids = [eos] + [specials.get(t) for t in HF_STOP_TOKENS]
        self.stop_ids = list(dict.fromkeys(int(i) for i in stop_ids if i is not None))
        self._max_token_bytes = None

    def _vocabulary_size(self):
        t = self.tokenizer
        if callable(getattr(t, "get_vocab_size", None)):  # tokenizers.Tokenizer
            return int(t.get_vocab_size(with_added_tokens=True))
        if callable(getattr(t, "__len__", None)):  # transformers
            return len(t)
        size = getattr(t, "vocabulary_size", getattr(t, "vocab_size", None))
        return int(size) if size is not None else None

    def _special_tokens(self):
        t = self.tokenizer
        if callable(getattr(t, "get_added_tokens_decoder", None)):
            return {token.content: int(i) for i, token in t.get_added_tokens_decoder().items()
                    if token.special}
        return {}

    def encode(self, text, add_bos=None):
        """Token ids of `text`, as the wrapped tokenizer gives them."""
        del add_bos  # the wrapped tokenizer decides (its post-processor)
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return _ids(self.tokenizer.encode(text))

    def decode(self, ids, skip_special_tokens=None):
        """Text of `ids` (special tokens as the wrapped tokenizer decodes them
        unless `skip_special_tokens` says otherwise)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens is None:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=bool(skip_special_tokens))

    def token_bytes(self, token_id):
        """UTF-8 bytes of one token's text on its own."""
        return self.decode([token_id]).encode("utf-8", errors="replace")

    @property
    def max_token_bytes(self):
        """A bound on the bytes of input text one token stands for (servers
        refuse longer prompts before tokenizing them)."""
        if self._max_token_bytes is None:
            vocabulary = (self.tokenizer.get_vocab()
                          if callable(getattr(self.tokenizer, "get_vocab", None)) else None)
            longest = max((len(t.encode("utf-8")) for t in vocabulary), default=16) \
                if vocabulary else 16
            # Normalizers may drop characters: leave generous room.
            self._max_token_bytes = 4 * longest + 16
        return self._max_token_bytes

    def stream_decoder(self, skip_special_tokens=False):
        del skip_special_tokens
        return PrefixDecoder(self.decode)

    def apply_chat_template(self, messages, add_generation_prompt=True, system=None):
        """The prompt text of a conversation (see `chat_prompt`)."""
        return chat_prompt(self, messages, add_generation_prompt, system)

    def to_json(self):
        """The tokenizer as Hugging Face `tokenizer.json` text, or None when
        the wrapped object cannot be written so."""
        to_str = getattr(self.tokenizer, "to_str", None)
        return to_str() if callable(to_str) else None


def tokenizer_format(path):
    """What a `tokenizer.json` is, from its content: "keras_llm" (keras-llm's
    byte-level BPE layout), "huggingface" (a `tokenizers` file) or None."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if "vocabulary" in config and "merges" in config:
        return "keras_llm"
    if isinstance(config.get("model"), dict):
        return "huggingface"
    return None


def load_tokenizer(path):
    """A host tokenizer from a `tokenizer.json` (or a directory holding one).

    Raises:
        ValueError: the file is neither keras-llm's nor Hugging Face's format.
        OSError: no such file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer file at {path}")
    kind = tokenizer_format(path)
    if kind == "keras_llm":
        return HostTokenizer.load(path)
    if kind == "huggingface":
        import tokenizers  # pylint: disable=import-outside-toplevel
        return TokenizerAdapter(tokenizers.Tokenizer.from_file(path))
    raise ValueError(f"{path} is neither a keras-llm nor a Hugging Face tokenizer.json")


def as_host_tokenizer(tokenizer):
    """What the engine tokenizes with, for a tokenizer object: keras-llm's
    in-graph `BytePairTokenizer` becomes a `HostTokenizer` with the same ids;
    a `HostTokenizer` or adapter is kept; anything else is wrapped in a
    `TokenizerAdapter`; None stays None (ids only)."""
    if tokenizer is None or isinstance(tokenizer, (HostTokenizer, TokenizerAdapter)):
        return tokenizer
    get_config = getattr(tokenizer, "get_config", None)
    if callable(get_config) and callable(getattr(tokenizer, "save_assets", None)):
        config = get_config()
        if isinstance(config, dict) and "vocabulary" in config and "merges" in config:
            return HostTokenizer(config)
    return TokenizerAdapter(tokenizer)
