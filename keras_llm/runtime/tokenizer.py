"""The host tokenizer: byte-level BPE without TensorFlow.

`HostTokenizer` reads keras-llm's `tokenizer.json` (the layout
`BytePairTokenizer.save_assets` writes: `vocabulary`, `merges`,
`special_tokens`, `bos_id`/`eos_id`/`pad_id`/`unk_id`, `add_bos`,
`chat_template`, `pretokenizer`) and encodes with Hugging Face `tokenizers`,
which gives the in-graph TensorFlow tokenizer's ids exactly (tests compare
the two). The engine, the CLI and the servers tokenize with it, so the
LiteRT route never imports TensorFlow; the in-graph `BytePairTokenizer`
stays for the SavedModel's signatures.

The pure-Python pieces both tokenizers share live here too: GPT-2's byte
table, the streaming decoder, the stop-id rule and the chat prompt
(`chat_prompt`: the model's own Jinja chat template, rendered as Hugging Face
transformers renders it, with ChatML as the fallback for a model without one).
"""

import codecs
import functools
import json
import os

TOKENIZER_FILE = "tokenizer.json"
STOP_TOKEN_STRINGS = ("<|im_end|>", "<|endoftext|>")


def bytes_to_unicode():
    """Returns GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls,
    space, DEL, NBSP, soft hyphen ...) map to ``chr(256 + k)`` in byte order.

    Returns:
        A list of 256 single-character strings indexed by byte value.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = [], 0
    for byte in range(256):
        if byte in printable:
            table.append(chr(byte))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


class StreamDecoder:
    """Incrementally turns generated token ids into text.

    ``push`` returns only newly completed characters: bytes of a UTF-8 sequence
    that is split across tokens are held back until the sequence is complete.
    Invalid bytes become U+FFFD, as in ``BytePairTokenizer.decode``.
    """

    def __init__(self, tokenizer, skip_special_tokens=False):
        """Creates a decoder.

        Args:
            tokenizer: The tokenizer whose vocabulary the ids index.
            skip_special_tokens: Whether special tokens produce no text.
        """
        self._tokenizer = tokenizer
        self._skip = set(tokenizer.special_token_ids) if skip_special_tokens else set()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        """Adds one token and returns the text it completes.

        Args:
            token_id: The next token id (ids outside the vocabulary are ignored).

        Returns:
            The newly decodable text, possibly empty.
        """
        token_id = int(token_id)
        if token_id in self._skip or not 0 <= token_id < self._tokenizer.vocabulary_size:
            return ""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self):
        """Returns whatever is still held back (an incomplete tail becomes U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


def token_bytes_table(vocabulary, special_tokens):
    """Raw bytes of every token: special tokens (and any token outside the
    byte alphabet) as their UTF-8 text, the rest through the byte table."""
    byte_decoder = {ch: b for b, ch in enumerate(bytes_to_unicode())}
    specials = set(special_tokens)
    table = []
    for token in vocabulary:
        if token in specials or any(ch not in byte_decoder for ch in token):
            table.append(token.encode("utf-8"))
        else:
            table.append(bytes(byte_decoder[ch] for ch in token))
    return table


def generation_stop_ids(index, eos_id):
    """Ids that end generation: eos, then `<|im_end|>` and `<|endoftext|>`
    when the vocabulary (`index`: token -> id) has them."""
    stop = [eos_id] + [index.get(t) for t in STOP_TOKEN_STRINGS]
    return list(dict.fromkeys(i for i in stop if i is not None))


CHAT_ROLES = ("system", "user", "assistant")


def chat_messages(messages, system=None):
    """Checks a conversation and returns it as a new list of plain dicts.

    Args:
        messages: one user turn as a string, or a non-empty list of
            ``{"role": "system" | "user" | "assistant", "content": str}``.
        system: optional system message placed first.

    Returns:
        ``[{"role": ..., "content": ...}, ...]``.

    Raises:
        ValueError: an unknown role, content that is not a string, an empty
            list, or ``system`` given for messages that start with one.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    elif isinstance(messages, dict) or not hasattr(messages, "__iter__"):
        raise ValueError("messages must be a string or a list of {'role', 'content'} dicts, "
                         f"got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, "
                             f"got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    if not checked:
        raise ValueError("messages is empty: give at least one message")
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"system must be a string, got {type(system).__name__}")
        if checked[0]["role"] == "system":
            raise ValueError("`system` given but the messages already start with a system message")
        checked.insert(0, {"role": "system", "content": system})
    return checked


def render_chatml(messages, add_generation_prompt=True, system=None):
    """Formats a conversation as ChatML: the fallback for a model without a
    chat template of its own.

    Each message becomes ``"<|im_start|>{role}\\n{content}<|im_end|>\\n"``.
    No system message is added unless ``system`` is given.

    Args:
        messages: as in `chat_messages`.
        add_generation_prompt: Append ``"<|im_start|>assistant\\n"``.
        system: Optional system message placed first.

    Returns:
        The prompt text.
    """
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
             for m in chat_messages(messages, system)]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _raise_template_error(message):
    import jinja2  # pylint: disable=import-outside-toplevel
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    # Jinja's own `tojson` HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template):
    """The compiled Jinja template (cached by its text).

    The environment is the one Hugging Face transformers renders chat
    templates in, so a model's template gives the text it gives there: a
    sandbox that cannot modify its inputs, ``trim_blocks`` and
    ``lstrip_blocks``, loop controls, ``raise_exception(message)``, a
    ``tojson`` that does not HTML-escape, and ``strftime_now(format)``.

    Raises:
        ValueError: the template does not parse.
    """
    import datetime  # pylint: disable=import-outside-toplevel

    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = lambda f: datetime.datetime.now().strftime(f)
    try:
        return environment.from_string(template)
    except jinja2.TemplateError as error:
        raise ValueError(f"the model's chat template does not parse: {error}") from None


def render_chat(template, messages, add_generation_prompt=True, system=None, bos_token=None,
                eos_token=None):
    """Renders a conversation with a model's Jinja chat template.

    Args:
        template: the template text; None or empty renders ChatML
            (`render_chatml`).
        messages: one user turn as a string, or a list of
            ``{"role": "system" | "user" | "assistant", "content": str}``.
        add_generation_prompt: end with the opening of the assistant's turn.
        system: optional system message placed first (an error if
            ``messages`` already start with one).
        bos_token, eos_token: the texts the template sees as ``bos_token``
            and ``eos_token`` (left undefined when None).

    Returns:
        The prompt text.

    Raises:
        ValueError: bad messages (see `chat_messages`), a template that does
            not parse, or one that refuses the conversation (its
            ``raise_exception``).

    Example:
        >>> render_chat(None, "hi")
        '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    messages = chat_messages(messages, system)
    if not template:
        return render_chatml(messages, add_generation_prompt)
    import jinja2  # pylint: disable=import-outside-toplevel

    tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token))
              if v is not None}
    try:
        return compile_chat_template(template).render(
            messages=messages, add_generation_prompt=bool(add_generation_prompt), **tokens)
    except jinja2.TemplateError as error:
        raise ValueError(f"the model's chat template refused the conversation: {error}") from None


def chat_prompt(tokenizer, messages, add_generation_prompt=True, system=None):
    """The prompt text of a conversation for `tokenizer` (a `HostTokenizer`
    or a `BytePairTokenizer`): its chat template rendered by `render_chat`
    with its bos/eos token texts. When the tokenizer adds bos itself
    (`add_bos`), a bos text the template put first is removed, so encoding
    the prompt does not give bos twice."""
    def token_text(token_id):
        return None if token_id is None else tokenizer.decode([token_id])

    bos = token_text(tokenizer.bos_id)
    prompt = render_chat(tokenizer.chat_template, messages, add_generation_prompt, system,
                         bos_token=bos, eos_token=token_text(tokenizer.eos_id))
    if tokenizer.add_bos and bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    return prompt


class HostTokenizer:
    """Byte-level BPE on the host, with the in-graph tokenizer's ids.

    Args:
        config: the dict in `tokenizer.json` (see the module docstring).

    Attributes:
        vocabulary_size, bos_id, eos_id, pad_id, unk_id, add_bos,
        special_token_ids, stop_ids, chat_template, pretokenizer: as in
        `keras_llm.tokenizer.BytePairTokenizer`.

    Example:
        >>> tok = HostTokenizer.load(model_dir)
        >>> tok.encode("Hello, world!")
        [19556, 28, 905, 17]
    """

    def __init__(self, config):
        # Imported here so that reading a tokenizer's metadata costs nothing.
        import tokenizers  # pylint: disable=import-outside-toplevel

        vocabulary = [str(t) for t in config["vocabulary"]]
        index = {}
        for i, token in enumerate(vocabulary):
            index.setdefault(token, i)
        specials = list(dict.fromkeys(str(t) for t in config.get("special_tokens") or [] if t))
        missing = [t for t in specials if t not in index]
        if missing:
            raise ValueError(f"special tokens not in vocabulary: {missing}")
        pretokenizer = config.get("pretokenizer", "smollm")
        if pretokenizer not in ("smollm", "gpt2"):
            raise ValueError(f"pretokenizer must be smollm or gpt2, got {pretokenizer!r}")
        self.vocabulary_size = len(vocabulary)
        self.bos_id, self.eos_id = config.get("bos_id"), config.get("eos_id")
        self.pad_id, self.unk_id = config.get("pad_id"), config.get("unk_id")
        self.add_bos = bool(config.get("add_bos", False))
        self.chat_template = config.get("chat_template")
        self.pretokenizer = pretokenizer
        self.special_token_ids = [index[t] for t in specials]
        self.stop_ids = generation_stop_ids(index, self.eos_id)
        # Each token's bytes are worked out when it is first decoded (the
        # whole table would cost a tenth of a second at start-up), from the
        # token's text in `tokenizers`' own table: a Python list of the
        # vocabulary would hold another 8 MB (SmolLM2) for the process's life.
        # Ids whose text is an earlier id's too are not in that table.
        self._duplicates = {i: t for i, t in enumerate(vocabulary) if index[t] != i}
        self._specials = set(specials)
        self._byte_decoder = {ch: b for b, ch in enumerate(bytes_to_unicode())}
        self._token_bytes = [None] * len(vocabulary)
        self._max_token_bytes = None
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in config["merges"]]
        model = tokenizers.models.BPE(vocab=index, merges=merges)
        hf = tokenizers.Tokenizer(model)
        byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pretokenizer == "smollm":
            hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
                [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            hf.pre_tokenizer = byte_level
        hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                               for t in specials])
        self._hf = hf

    @classmethod
    def load(cls, directory):
        """Read `tokenizer.json` from `directory` (or the file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        version = config.pop("format_version", 1)
        if version != 1:
            raise ValueError(f"unsupported tokenizer asset format version {version}")
        return cls(config)

    def encode(self, text, add_bos=None):
        """Token ids of `text` (with `bos_id` first when `add_bos`)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._hf.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else bool(add_bos)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    @property
    def max_token_bytes(self):
        """The most bytes one token stands for (a bound for length checks)."""
        if self._max_token_bytes is None:
            # A byte-level symbol is one byte; other characters at most four.
            self._max_token_bytes = max(
                (len(t.encode("utf-8")) for t in self._hf.get_vocab(with_added_tokens=True)),
                default=1)
        return self._max_token_bytes

    def token_bytes(self, token_id):
        token_id = int(token_id)
        if not 0 <= token_id < self.vocabulary_size:
            raise IndexError(f"token id {token_id} outside [0, {self.vocabulary_size})")
        data = self._token_bytes[token_id]
        if data is None:
            token = self._duplicates.get(token_id)
            if token is None:
                token = self._hf.id_to_token(token_id)
            table = self._byte_decoder
            if token in self._specials or any(ch not in table for ch in token):
                data = token.encode("utf-8")
            else:
                data = bytes(table[ch] for ch in token)
            self._token_bytes[token_id] = data
        return data

    def decode(self, ids, skip_special_tokens=False):
        """Text of `ids`; invalid UTF-8 becomes U+FFFD, unknown ids are ignored."""
        skip = set(self.special_token_ids) if skip_special_tokens else set()
        size = self.vocabulary_size
        data = b"".join(self.token_bytes(i) for i in map(int, ids)
                        if 0 <= i < size and i not in skip)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens=False):
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, system=None):
        """The prompt text of a conversation: the model's chat template (ChatML
        when it has none), see `chat_prompt`. Raises ValueError for bad messages."""
        return chat_prompt(self, messages, add_generation_prompt, system)
