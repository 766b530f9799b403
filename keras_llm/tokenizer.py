"""GPT-2 style byte-level BPE tokenizer built from TensorFlow graph ops.

The tokenizer runs entirely on TensorFlow / tensorflow-text ops and static
hash tables, so ``tokenize`` and ``detokenize`` can be traced into a
``tf.function`` and exported with ``tf.saved_model.save``.  No mutable tables
and no ``tf.py_function`` are used.  (A program that loads such a SavedModel
must ``import tensorflow_text`` first so the regex ops are registered.)

Pipeline of ``tokenize`` for a batch of strings:

1. **Atoms.**  One ``regex_split`` cuts each string into special tokens,
   single whitespace characters, single numeric characters and the chunks in
   between.
2. **Sub-segments.**  Atoms are joined back into sub-segments.  A new
   sub-segment starts at every special token, right after every special
   token, and before the last character of each whitespace run of two or more
   characters that is followed by ordinary text.  That last cut emulates the
   ``\\s+(?!\\S)`` branch of the GPT-2 regex, which RE2 cannot express because
   it has no look-ahead: inside a sub-segment a plain ``\\s+`` then produces
   exactly the tokens the original regex produces.
3. **Words.**  A second ``regex_split`` applies the look-ahead-free GPT-2
   pattern (with numeric characters isolated for the SmolLM pre-tokenizer) to
   every sub-segment.
4. **BPE.**  Word bytes become byte-token ids; a ``tf.while_loop`` then merges,
   for every word of the batch at once, all occurrences of the word's
   lowest-ranked pair per iteration until no pair is mergeable.  Pair lookups
   use a static ``int64 -> int64`` table keyed by ``left_id * vocab + right_id``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable, Sequence

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_text as tf_text  # noqa: E402

from keras_llm.runtime.tokenizer import (  # noqa: E402
    StreamDecoder, bytes_to_unicode, chat_prompt, generation_stop_ids, token_bytes_table)

__all__ = ["BytePairTokenizer", "StreamDecoder", "bytes_to_unicode", "TOKENIZER_ASSET_FILE"]

TOKENIZER_ASSET_FILE = "tokenizer.json"
_ASSET_FORMAT_VERSION = 1

# Unicode White_Space, which is what Oniguruma's ``\s`` (used by the Hugging
# Face reference) matches; RE2's own ``\s`` is ASCII-only.
_WS = r"\t-\r\x{85}\p{Z}"
_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"
# Word patterns without the look-ahead branch.  "smollm" isolates every
# numeric character (HF ``Digits(individual_digits=True)`` splits on
# ``char::is_numeric``, i.e. ``\p{N}``) before applying the GPT-2 regex.
_WORD_PATTERNS = {
    "smollm": rf"\p{{N}}|{_CONTRACTIONS}| ?\p{{L}}+| ?[^{_WS}\p{{L}}\p{{N}}]+|[{_WS}]+",
    "gpt2": rf"{_CONTRACTIONS}| ?\p{{L}}+| ?\p{{N}}+| ?[^{_WS}\p{{L}}\p{{N}}]+|[{_WS}]+",
}
# Pre-tokenizer names used by GGUF's ``tokenizer.ggml.pre`` that map onto ours.
_GGUF_PRETOKENIZERS = {"smollm": "smollm", "gpt2": "gpt2", "default": "gpt2"}
_CONTROL_TOKEN_TYPES = (3, 4)  # llama.cpp: CONTROL, USER_DEFINED
_NO_MERGE = np.iinfo(np.int64).max
# tensorflow-text's regex_split stops reading an input string at its first NUL
# byte, so NUL is escaped for the regex passes.  The escape sequences consist of
# private-use characters, which fall in the same regex class as NUL
# (`[^\s\p{L}\p{N}]`) and therefore never get split apart or change the
# tokenization; the escape character itself is escaped too, so the mapping is
# reversible for any input.
_ESCAPE = "\U0010FFFD"
_ESCAPED_NUL = _ESCAPE + "\U0010FFFC"
_ESCAPED_ESCAPE = _ESCAPE + "\U0010FFFB"


def _re2_literal(text: str) -> str:
    """Escapes ``text`` as an RE2 literal (every character as ``\\x{..}``)."""
    return "".join(f"\\x{{{ord(ch):x}}}" for ch in text)


@dataclasses.dataclass
class _PythonState:
    """Plain-Python data of a tokenizer (kept out of tf.Module tracking)."""

    vocabulary: list[str]
    merges: list[str]
    special_tokens: list[str]
    token_bytes: list[bytes]
    chat_template: str | None
    special_token_ids: list[int]
    stop_ids: list[int]
    byte_ids: list[int]
    encode_fn: Any = None


class BytePairTokenizer(tf.Module):
    """Byte-level BPE tokenizer (GPT-2 family) implemented with TF graph ops.

    Attributes:
        vocabulary_size: Number of tokens in the vocabulary.
        bos_id, eos_id, pad_id, unk_id: Special ids (``None`` when absent).
        add_bos: Whether ``tokenize`` prepends ``bos_id`` by default.
        special_token_ids: Ids of the literally matched special tokens.
        stop_ids: Ids that end generation: eos, ``<|im_end|>``, ``<|endoftext|>``.
        pretokenizer: ``"smollm"`` or ``"gpt2"``.
    """

    def __init__(
        self,
        vocabulary: list[str],
        merges: list[str],
        special_tokens: list[str] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        pretokenizer: str = "smollm",
    ):
        """Builds the lookup tables.

        Args:
            vocabulary: Token strings in GPT-2 byte-to-unicode form; the index is the id.
            merges: Merge rules ``"left right"`` (or ``(left, right)`` pairs), best first.
            special_tokens: Token strings matched literally in the input before
                pre-tokenization (e.g. ``<|im_start|>``); each must be in ``vocabulary``.
            bos_id: Beginning-of-sequence id.
            eos_id: End-of-sequence id.
            pad_id: Padding id.
            unk_id: Id used for a byte that has no byte token (never needed for
                a complete byte-level vocabulary).
            add_bos: Whether ``tokenize`` prepends ``bos_id`` by default.
            chat_template: The model's Jinja chat template, which
                ``apply_chat_template`` renders (ChatML when None).
            pretokenizer: ``"smollm"`` (every numeric character split off) or ``"gpt2"``.
        """
        super().__init__(name="byte_pair_tokenizer")
        if pretokenizer not in _WORD_PATTERNS:
            raise ValueError(f"pretokenizer must be one of {sorted(_WORD_PATTERNS)}, got {pretokenizer!r}")
        vocabulary = [str(token) for token in vocabulary]
        index = {}
        for i, token in enumerate(vocabulary):
            index.setdefault(token, i)
        special_tokens = [str(t) for t in (special_tokens or []) if t]
        missing = [t for t in special_tokens if t not in index]
        if missing:
            raise ValueError(f"special tokens not in vocabulary: {missing}")
        special_tokens = list(dict.fromkeys(special_tokens))
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

        self.vocabulary_size = len(vocabulary)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = bool(add_bos)
        self.pretokenizer = pretokenizer
        special_token_ids = [index[t] for t in special_tokens]
        stop_ids = generation_stop_ids(index, eos_id)

        # Raw bytes of every token.
        token_bytes = token_bytes_table(vocabulary, special_tokens)
        fallback = unk_id if unk_id is not None else 0
        byte_ids = [index.get(ch, fallback) for ch in bytes_to_unicode()]
        # Python containers live in a plain dataclass: tf.Module would wrap
        # list attributes into tracked ListWrappers.
        self._py = _PythonState(
            vocabulary, merges, special_tokens, token_bytes, chat_template, special_token_ids, stop_ids, byte_ids
        )
        self._merge_table = self._build_merge_table(merges, index)
        self._id_to_bytes = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.range(self.vocabulary_size, dtype=tf.int64),
                tf.constant(np.array(token_bytes, dtype=object), dtype=tf.string),
            ),
            default_value=b"",
        )
        if special_tokens:
            self._special_table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(special_tokens, dtype=tf.string),
                    tf.constant(self.special_token_ids, dtype=tf.int64),
                ),
                default_value=-1,
            )
            # Longest first so that a special token wins over its own prefix.
            alternation = "|".join(_re2_literal(t) for t in sorted(special_tokens, key=len, reverse=True))
            special_prefix = f"{alternation}|"
        else:
            self._special_table = None
            special_prefix = ""
        numeric_atom = r"|\p{N}" if pretokenizer == "smollm" else ""
        self._atom_pattern = f"{special_prefix}[{_WS}]{numeric_atom}"
        self._word_pattern = special_prefix + _WORD_PATTERNS[pretokenizer]

    def _build_merge_table(self, merges: list[str], index: dict[str, int]) -> tf.lookup.StaticHashTable:
        """Builds the ``left * V + right -> rank << 32 | merged_id`` table.

        Args:
            merges: Merge rules ``"left right"``, best first.
            index: Token string -> id.

        Returns:
            A static int64 -> int64 hash table (default: a value above every rank).
        """
        size = self.vocabulary_size
        packed: dict[int, int] = {}
        for rank, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"malformed merge rule {merge!r}")
            left, right = index.get(parts[0]), index.get(parts[1])
            merged = index.get(parts[0] + parts[1])
            if left is None or right is None or merged is None:
                continue  # A rule whose tokens are not in the vocabulary never fires.
            packed.setdefault(left * size + right, (rank << 32) | merged)
        keys = np.fromiter(packed.keys(), dtype=np.int64, count=len(packed))
        values = np.fromiter(packed.values(), dtype=np.int64, count=len(packed))
        return tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default_value=_NO_MERGE
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_gguf(cls, reader_or_path) -> "BytePairTokenizer":
        """Creates the tokenizer described by a GGUF file's ``tokenizer.*`` metadata.

        Args:
            reader_or_path: A ``gguf.GGUFReader`` or a path to a ``.gguf`` file.

        Returns:
            The tokenizer.
        """
        if hasattr(reader_or_path, "fields"):
            reader = reader_or_path
        else:
            import gguf

            reader = gguf.GGUFReader(os.fspath(reader_or_path))

        def field(name: str, default=None):
            value = reader.fields.get(name)
            return default if value is None else value.contents()

        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model!r}")
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in _GGUF_PRETOKENIZERS:
            raise ValueError(
                f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_GGUF_PRETOKENIZERS)}"
            )
        tokens = list(field("tokenizer.ggml.tokens"))
        token_types = list(field("tokenizer.ggml.token_type", [1] * len(tokens)))
        specials = [t for t, kind in zip(tokens, token_types) if kind in _CONTROL_TOKEN_TYPES]
        return cls(
            vocabulary=tokens,
            merges=list(field("tokenizer.ggml.merges", [])),
            special_tokens=specials,
            bos_id=field("tokenizer.ggml.bos_token_id"),
            eos_id=field("tokenizer.ggml.eos_token_id"),
            pad_id=field("tokenizer.ggml.padding_token_id"),
            unk_id=field("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
            chat_template=field("tokenizer.chat_template"),
            pretokenizer=_GGUF_PRETOKENIZERS[pre],
        )

    def get_config(self) -> dict:
        """Returns everything needed to rebuild this tokenizer (JSON-serializable)."""
        return {
            "format_version": _ASSET_FORMAT_VERSION,
            "vocabulary": self._py.vocabulary,
            "merges": self._py.merges,
            "special_tokens": self._py.special_tokens,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "add_bos": self.add_bos,
            "chat_template": self._py.chat_template,
            "pretokenizer": self.pretokenizer,
        }

    def save_assets(self, directory) -> None:
        """Writes ``tokenizer.json`` (vocabulary, merges, specials, ids, template).

        Args:
            directory: Destination directory (created if missing).
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / TOKENIZER_ASSET_FILE, "w", encoding="utf-8") as f:
            json.dump(self.get_config(), f, ensure_ascii=False)

    @classmethod
    def load_assets(cls, directory) -> "BytePairTokenizer":
        """Recreates a tokenizer written by ``save_assets``.

        Args:
            directory: Directory holding ``tokenizer.json``.

        Returns:
            The tokenizer.
        """
        return cls.from_config_file(pathlib.Path(directory) / TOKENIZER_ASSET_FILE)

    @classmethod
    def from_config_file(cls, path) -> "BytePairTokenizer":
        """Recreates a tokenizer from a ``tokenizer.json`` file (any name)."""
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        version = config.pop("format_version", _ASSET_FORMAT_VERSION)
        if version != _ASSET_FORMAT_VERSION:
            raise ValueError(f"unsupported tokenizer asset format version {version}")
        return cls(**config)

    # ------------------------------------------------------------- graph ops

    @tf.autograph.experimental.do_not_convert
    def tokenize(self, strings, add_bos: bool | None = None):
        """Tokenizes a batch of UTF-8 strings (graph-compatible).

        Args:
            strings: ``tf.string`` tensor of shape ``[B]`` (or a scalar).
            add_bos: Prepend ``bos_id``; ``None`` uses ``self.add_bos``.

        Returns:
            ``int32`` ``tf.RaggedTensor`` of shape ``[B, None]``; for a scalar
            input an ``int32`` tensor of shape ``[T]``.
        """
        strings = tf.convert_to_tensor(strings, dtype=tf.string)
        rank = strings.shape.rank
        if rank not in (0, 1):
            raise ValueError(f"tokenize expects a scalar or a vector of strings, got rank {rank}")
        if rank == 0:
            return self.tokenize(strings[tf.newaxis], add_bos=add_bos)[0]
        batch = tf.shape(strings, out_type=tf.int64)[0]

        words, word_rows = self._pretokenize(strings)  # [W] words, [W] batch row of each
        num_words = tf.shape(words, out_type=tf.int64)[0]
        if self._special_table is not None:
            word_special = self._special_table.lookup(words)  # [W], -1 if not special
            # A special word becomes one placeholder byte, replaced after BPE.
            words = tf.where(word_special >= 0, tf.constant(b"\x00"), words)
        byte_values = tf.io.decode_raw(tf.strings.reduce_join(words), tf.uint8)  # [N]
        ids = tf.gather(tf.constant(self._py.byte_ids, dtype=tf.int64), tf.cast(byte_values, tf.int32))
        rows = tf.repeat(tf.range(num_words), tf.cast(tf.strings.length(words), tf.int64))  # [N]
        ids, rows = self._bpe(ids, rows, num_words)  # [N'], [N']
        if self._special_table is not None:
            special = tf.gather(word_special, rows)
            ids = tf.where(special >= 0, special, ids)
        tokens = tf.RaggedTensor.from_value_rowids(
            tf.cast(ids, tf.int32), tf.gather(word_rows, rows), nrows=batch, validate=False
        )  # [B, None]
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos requested but the tokenizer has no bos_id")
            bos = tf.RaggedTensor.from_tensor(tf.fill(tf.stack([batch, 1]), tf.constant(self.bos_id, tf.int32)))
            tokens = tf.concat([bos, tokens], axis=1)
        return tokens

    @tf.autograph.experimental.do_not_convert
    def _pretokenize(self, strings: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Splits strings into BPE words and literal special tokens.

        Args:
            strings: ``tf.string`` ``[B]``.

        Returns:
            ``(words, rows)``: ``tf.string`` ``[W]`` in order and ``int64`` ``[W]``,
            the batch row of each word.
        """
        strings = tf.strings.regex_replace(strings, _re2_literal(_ESCAPE), _ESCAPED_ESCAPE)
        strings = tf.strings.regex_replace(strings, r"\x00", _ESCAPED_NUL)
        atoms = tf_text.regex_split(strings, self._atom_pattern, self._atom_pattern)  # [B, A]
        text = atoms.flat_values  # [n]
        rows = atoms.value_rowids()  # [n] int64
        n = tf.size(text)
        row_change = tf.not_equal(rows[1:], rows[:-1])
        first = tf.concat([[True], row_change], 0)[:n]
        last = tf.concat([row_change, [True]], 0)[:n]

        def previous(flags):  # flags[i - 1] within the same row
            return tf.concat([[False], flags[:-1]], 0)[:n] & ~first

        def following(flags):  # flags[i + 1] within the same row
            return tf.concat([flags[1:], [False]], 0)[:n] & ~last

        is_ws = tf.strings.regex_full_match(text, f"[{_WS}]")
        plain = ~is_ws  # ordinary text that follows a whitespace run
        if self.pretokenizer == "smollm":
            plain &= ~tf.strings.regex_full_match(text, r"\p{N}")
        if self._special_table is not None:
            is_special = self._special_table.lookup(text) >= 0
            plain &= ~is_special
        else:
            is_special = tf.zeros_like(is_ws)
        # Cut before the last character of a >= 2 character whitespace run that
        # is followed by ordinary text (this is what `\s+(?!\S)` does).
        ws_cut = is_ws & previous(is_ws) & following(plain)
        starts = first | is_special | previous(is_special) | ws_cut  # [n]
        segment_ids = tf.cumsum(tf.cast(starts, tf.int32)) - 1
        segments = tf.strings.unsorted_segment_join(
            text, segment_ids, tf.reduce_sum(tf.cast(starts, tf.int32))
        )  # [S]
        segment_rows = tf.boolean_mask(rows, starts)  # [S]
        words = tf_text.regex_split(segments, self._word_pattern, self._word_pattern)  # [S, W]
        text = tf.strings.regex_replace(words.flat_values, _re2_literal(_ESCAPED_NUL), "\x00")
        text = tf.strings.regex_replace(text, _re2_literal(_ESCAPED_ESCAPE), _ESCAPE)
        return text, tf.gather(segment_rows, words.value_rowids())

    @tf.autograph.experimental.do_not_convert
    def _bpe(self, ids: tf.Tensor, rows: tf.Tensor, num_words: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Applies the merges to all words at once.

        Every iteration merges, in each word, all non-overlapping occurrences
        (left to right) of that word's lowest-ranked mergeable pair.

        Args:
            ids: ``int64`` ``[N]`` token ids of all words, concatenated.
            rows: ``int64`` ``[N]`` word index of each id (non-decreasing).
            num_words: ``int64`` scalar, the number of words.

        Returns:
            ``(ids, rows)`` after merging, shapes ``[N']``.
        """
        size = tf.constant(self.vocabulary_size, tf.int64)
        no_merge = tf.constant(_NO_MERGE, tf.int64)

        def body(ids, rows, _):
            pair_rows = rows[:-1]  # [N - 1]
            packed = self._merge_table.lookup(ids[:-1] * size + ids[1:])  # rank << 32 | merged id
            packed = tf.where(tf.equal(pair_rows, rows[1:]), packed, no_merge)
            best = tf.math.unsorted_segment_min(packed, pair_rows, num_words)  # [num_words]
            chosen = (packed == tf.gather(best, pair_rows)) & (packed != no_merge)
            chosen = _alternate_runs(chosen)  # drop overlaps such as the 2nd "a a" in "a a a"
            merged = tf.bitwise.bitwise_and(packed, tf.constant(0xFFFFFFFF, tf.int64))
            ids = tf.where(tf.concat([chosen, [False]], 0), tf.concat([merged, [0]], 0), ids)
            keep = ~tf.concat([[False], chosen], 0)
            return tf.boolean_mask(ids, keep), tf.boolean_mask(rows, keep), tf.reduce_any(chosen)

        ids, rows, _ = tf.while_loop(
            lambda ids, rows, changed: changed,
            body,
            (ids, rows, tf.size(ids) > 1),
            shape_invariants=(tf.TensorShape([None]), tf.TensorShape([None]), tf.TensorShape([])),
        )
        return ids, rows

    @tf.autograph.experimental.do_not_convert
    def detokenize(self, ids, skip_special_tokens: bool = False) -> tf.Tensor:
        """Joins token bytes back into strings (graph-compatible).

        Ids outside ``[0, vocabulary_size)`` (e.g. a -1 padding value) produce no
        bytes.  Use a ragged input, out-of-range padding values, or
        ``skip_special_tokens=True`` to keep ``pad_id`` padding out of the text.
        The result holds the exact bytes, so it may be invalid UTF-8 when the ids
        end in the middle of a character.

        Args:
            ids: Integer ids, dense ``[B, T]`` / ``[T]`` or ragged ``[B, None]``.
            skip_special_tokens: Whether special tokens produce no bytes.

        Returns:
            ``tf.string`` of shape ``[B]`` (a scalar for ``[T]`` input).
        """
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.convert_to_tensor(ids)
        ids = tf.cast(ids, tf.int64)

        def to_bytes(flat):
            pieces = self._id_to_bytes.lookup(flat)
            if skip_special_tokens and self.special_token_ids:
                special = tf.reduce_any(
                    tf.equal(flat[..., tf.newaxis], tf.constant(self.special_token_ids, tf.int64)), axis=-1
                )
                pieces = tf.where(special, tf.constant(b""), pieces)
            return pieces

        if isinstance(ids, tf.RaggedTensor):
            pieces = tf.ragged.map_flat_values(to_bytes, ids)
        else:
            pieces = to_bytes(ids)
        return tf.strings.reduce_join(pieces, axis=-1)

    # ---------------------------------------------------------- Python helpers

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Tokenizes one string.

        Args:
            text: The text.
            add_bos: Prepend ``bos_id``; ``None`` uses ``self.add_bos``.

        Returns:
            The token ids.
        """
        if self._py.encode_fn is None:
            self._py.encode_fn = tf.function(
                lambda strings, add_bos: self.tokenize(strings, add_bos=add_bos).flat_values,
                reduce_retracing=True,
            )
        add_bos = self.add_bos if add_bos is None else bool(add_bos)
        return self._py.encode_fn(tf.constant([text]), add_bos).numpy().tolist()

    def token_bytes(self, token_id: int) -> bytes:
        """Returns the raw bytes of a token.

        Args:
            token_id: A token id in ``[0, vocabulary_size)``.

        Returns:
            The bytes (a special token's text, UTF-8 encoded).
        """
        token_id = int(token_id)
        if not 0 <= token_id < self.vocabulary_size:
            raise IndexError(f"token id {token_id} outside [0, {self.vocabulary_size})")
        return self._py.token_bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decodes ids to text; invalid UTF-8 becomes U+FFFD.

        Args:
            ids: Token ids; ids outside the vocabulary are ignored.
            skip_special_tokens: Whether special tokens produce no text.

        Returns:
            The text.
        """
        skip = set(self.special_token_ids) if skip_special_tokens else set()
        table, size = self._py.token_bytes, self.vocabulary_size
        data = b"".join(table[i] for i in map(int, ids) if 0 <= i < size and i not in skip)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """Returns a ``StreamDecoder`` for incremental decoding.

        Args:
            skip_special_tokens: Whether special tokens produce no text.
        """
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """Returns the vocabulary string (byte-to-unicode form) of an id."""
        return self._py.vocabulary[int(token_id)]

    @property
    def special_token_ids(self) -> list[int]:
        """Ids of the special tokens that are matched literally in the input."""
        return list(self._py.special_token_ids)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: eos, ``<|im_end|>`` and ``<|endoftext|>`` when present."""
        return list(self._py.stop_ids)

    @property
    def vocabulary(self) -> list[str]:
        """The vocabulary strings (do not modify)."""
        return self._py.vocabulary

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template read from the model, if any (`apply_chat_template` renders it)."""
        return self._py.chat_template

    def apply_chat_template(
        self,
        messages: Sequence[dict] | str,
        add_generation_prompt: bool = True,
        system: str | None = None,
    ) -> str:
        """Formats a conversation with the model's chat template (ChatML when it
        has none); see `keras_llm.runtime.tokenizer.chat_prompt`.

        Args:
            messages: one user turn as a string, or a list of
                ``{"role": "system" | "user" | "assistant", "content": str}``.
            add_generation_prompt: end with the opening of the assistant's turn.
            system: optional system message placed first.

        Returns:
            The prompt text.

        Raises:
            ValueError: bad messages, or a template that refuses them.
        """
        return chat_prompt(self, messages, add_generation_prompt, system)


@tf.autograph.experimental.do_not_convert
def _alternate_runs(flags: tf.Tensor) -> tf.Tensor:
    """Keeps the 1st, 3rd, 5th ... element of every run of consecutive ``True``.

    Args:
        flags: ``bool`` ``[M]``.

    Returns:
        ``bool`` ``[M]``.
    """
    padded = tf.concat([[False], flags], 0)  # [M + 1]; every run now follows a False
    run_ids = tf.cumsum(tf.cast(~padded, tf.int32)) - 1  # the False before a run shares its id
    positions = tf.range(tf.size(padded))
    run_starts = tf.math.unsorted_segment_min(positions, run_ids, tf.size(padded))
    offsets = positions - tf.gather(run_starts, run_ids)  # 1, 2, 3 ... inside a run
    return (padded & (offsets % 2 == 1))[1:]
