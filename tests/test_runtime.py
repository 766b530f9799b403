"""The runtime: one SamplingParams, the host sampler and tokenizer, sequence
bookkeeping, the engine over both backends, the artifact cache, cold start."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_llm
from keras_llm import saving, samplers
from keras_llm.runtime import artifacts, sampling
from keras_llm.runtime.engine import Engine, EngineConfig, InvalidRequest, QueueFull
from keras_llm.runtime.litert import weights_cache_path
from keras_llm.runtime.params import InvalidParams, SamplingParams
from keras_llm.runtime.sequence import Sequence
from keras_llm.runtime.tokenizer import HostTokenizer
from keras_llm.runtime.xla import XLABackend
from tests.helpers import REPO, SMOLLM2_CHAT_TEMPLATE, byte_level_tokenizer, tiny_language_model


# ----- SamplingParams ----------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "finite"),
    ("temperature", float("inf"), "finite"),
    ("temperature", -0.1, ">= 0"),
    ("max_new_tokens", -5, ">= 0"),
    ("max_new_tokens", 2.5, "integer"),
    ("max_new_tokens", True, "integer"),
    ("top_k", -1, ">= 0"),
    ("top_p", 0.0, r"\(0, 1\]"),
    ("top_p", 1.5, r"\(0, 1\]"),
    ("top_p", float("nan"), "finite"),
    ("stop", ("",), "empty"),
    ("stop", (3,), "strings"),
    ("stop_ids", (-1,), "non-negative"),
])
def test_sampling_params_reject_bad_values(field, value, message):
    with pytest.raises(InvalidParams, match=message):
        SamplingParams(**{field: value}).validate()


def test_sampling_params_normalize():
    params = SamplingParams(max_new_tokens=np.int64(4), temperature=1, stop="end",
                            stop_ids=[np.int32(7)]).validate()
    assert (params.max_new_tokens, params.temperature, params.stop, params.stop_ids) == (
        4, 1.0, ("end",), (7,))
    assert isinstance(params.max_new_tokens, int) and not params.greedy


# ----- sampler ------------------------------------------------------------------


def test_host_noise_is_the_graph_noise_bit_for_bit():
    seeds = np.array([0, 1, 12345, -7, 2 ** 31 - 1], np.int32)
    steps = np.array([0, 5, 99, 3, 1000], np.int32)
    expected = samplers.uniform_noise(tf.constant(seeds), tf.constant(steps), 997).numpy()
    np.testing.assert_array_equal(sampling.uniform_noise(seeds, steps, 997), expected)


def test_host_sampler_picks_the_graph_samplers_tokens():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(64, 300)) * 3).astype(np.float32)
    temperature = rng.choice([0.0, 0.5, 1.0, 1.7], 64).astype(np.float32)
    top_k = rng.choice([0, 1, 5, 40], 64).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5], 64).astype(np.float32)
    seeds = rng.integers(0, 1000, 64).astype(np.int32)
    steps = rng.integers(0, 50, 64).astype(np.int32)
    expected = samplers.sample_next(tf.constant(logits), tf.constant(temperature),
                                    tf.constant(top_k), tf.constant(top_p), tf.constant(seeds),
                                    tf.constant(steps)).numpy()
    got = sampling.sample(logits, temperature, top_k, top_p, seeds, steps)
    np.testing.assert_array_equal(got, expected)
    assert len(set(got[temperature > 0].tolist())) > 10  # it really samples


# ----- sequence bookkeeping ------------------------------------------------------


@pytest.fixture(scope="module")
def host():
    return HostTokenizer(byte_level_tokenizer(["h e", "l l", "he ll"]).get_config())


def push_all(seq, ids):
    return "".join(seq.push(t) for t in ids if not seq.done)


def test_sequence_stops_on_model_and_request_stop_ids(host):
    ids = host.encode("hello world")
    seq = Sequence(SamplingParams(max_new_tokens=50), host.stop_ids, host.stream_decoder())
    text = push_all(seq, ids[:3] + [host.stop_ids[0]] + ids[3:])
    assert (seq.finish_reason, seq.tokens, text) == ("stop", ids[:3], host.decode(ids[:3]))
    extra = max(ids) + 1
    seq = Sequence(SamplingParams(max_new_tokens=50, ignore_eos=True, stop_ids=(extra,)),
                   host.stop_ids, host.stream_decoder())
    push_all(seq, ids[:2] + [host.stop_ids[0]] + ids[2:] + [extra] + ids)
    assert seq.tokens == ids[:2] + [host.stop_ids[0]] + ids[2:]
    assert seq.finish_reason == "stop"


def test_sequence_holds_back_stop_strings_and_split_characters(host):
    ids = host.encode("hello 你好 world, and more")
    full = host.decode(ids)
    for stop in ("好 w", "d,", "lo", "more"):
        seq = Sequence(SamplingParams(max_new_tokens=100, stop=(stop, "never")), (),
                       host.stream_decoder())
        sent = []
        for token in ids:
            if seq.done:
                break
            sent.append(seq.push(token))
        assert seq.finish_reason == "stop" and seq.text == full[:full.index(stop)]
        assert "".join(sent) == seq.text and all("\ufffd" not in s for s in sent)


def test_sequence_length_limit_and_zero(host):
    ids = host.encode("hello world")
    seq = Sequence(SamplingParams(max_new_tokens=3), (), host.stream_decoder())
    assert push_all(seq, ids) == host.decode(ids[:3]) and seq.finish_reason == "length"
    assert Sequence(SamplingParams(max_new_tokens=0), (), host.stream_decoder()).done


# ----- host tokenizer --------------------------------------------------------------


def test_host_tokenizer_matches_the_graph_tokenizer():
    graph = byte_level_tokenizer(["h e", "l l", "he ll", "o w"])
    host = HostTokenizer(graph.get_config())
    rng = random.Random(1)
    alphabet = list("aabclowhet' sS12\n\t\u3000é🤖!") + ["<|im_end|>", "<|im_start|>", "  "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    assert [host.encode(t) for t in texts] == graph.tokenize(tf.constant(texts)).to_list()
    assert host.stop_ids == graph.stop_ids and host.pad_id == graph.pad_id
    ids = host.encode("héllo 🤖")
    assert host.decode(ids) == graph.decode(ids) == "héllo 🤖"
    assert host.apply_chat_template("hi", system="be brief") == graph.apply_chat_template(
        "hi", system="be brief")
    templated = byte_level_tokenizer(["h e"], chat_template=SMOLLM2_CHAT_TEMPLATE)
    host = HostTokenizer(templated.get_config())
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
    assert host.apply_chat_template(messages) == templated.apply_chat_template(messages)
    assert host.apply_chat_template(messages).startswith("<|im_start|>system\nYou are")


def test_language_model_takes_a_conversation_with_chat():
    lm = tiny_language_model(seed=3, chat_template=SMOLLM2_CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    text = lm.host_tokenizer.apply_chat_template(messages)
    assert lm.encode(messages, chat=True) == lm.encode(text)
    assert lm.encode("more", chat=True) == lm.encode(lm.host_tokenizer.apply_chat_template("more"))
    with pytest.raises(ValueError, match="chat=True"):
        lm.encode(messages)
    with pytest.raises(ValueError, match="role"):
        lm.encode([{"role": "robot", "content": "x"}], chat=True)
    completion = lm.generate(messages, chat=True, max_new_tokens=5, ignore_eos=True)
    assert completion.prompt_token_ids == lm.encode(text)
    assert completion.token_ids == lm.generate(text, max_new_tokens=5, ignore_eos=True).token_ids
    batch = lm.generate([messages, messages[:2]], chat=True, max_new_tokens=5, ignore_eos=True)
    assert batch[0].token_ids == completion.token_ids
    final = list(lm.stream(messages, chat=True, max_new_tokens=5, ignore_eos=True))[-1]
    assert final.token_ids == completion.token_ids


# ----- the engine over both backends ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    lm = tiny_language_model(seed=8)
    directory = tmp_path_factory.mktemp("model") / "tiny"
    saving.save_model_dir(directory, lm.model, lm.tokenizer, {"source": "tiny"})
    return lm, str(directory)


REQUESTS = [("hello", dict(max_new_tokens=9)),
            ("hello world", dict(max_new_tokens=12, temperature=0.9, top_k=20, seed=4)),
            ("he", dict(max_new_tokens=6, temperature=0.7, top_p=0.8, seed=1)),
            ("lll", dict(max_new_tokens=15, stop=("l",)))]


def test_backends_give_the_same_tokens_alone_and_batched(tiny_dir):
    lm, directory = tiny_dir
    fast = keras_llm.load(directory, backend="litert", progress=False)
    xla = keras_llm.load(directory, backend="xla", progress=False)
    assert fast.engine.backend.capabilities.name == "litert"
    assert xla.engine.backend.capabilities.name == "xla"
    for prompt, options in REQUESTS:
        alone = [m.generate(prompt, **options) for m in (fast, xla, lm)]
        assert alone[0].token_ids == alone[1].token_ids == alone[2].token_ids, prompt
        assert alone[0].text == alone[1].text
    # Requests that join and leave each other's batch get the same tokens.
    for model in (fast, xla):
        jobs = [model.engine.submit(model.encode(p), model.sampling_params(**o))
                for p, o in REQUESTS]
        for job in jobs:
            model.engine._wait(job)  # pylint: disable=protected-access
        assert [j.result.token_ids for j in jobs] == [
            fast.generate(p, **o).token_ids for p, o in REQUESTS]


def test_stream_yields_what_generate_returns(tiny_dir):
    _, directory = tiny_dir
    lm = keras_llm.load(directory, progress=False)
    items = list(lm.stream("hello 你好", chat=True, max_new_tokens=12, ignore_eos=True))
    final = items[-1]
    assert isinstance(final, keras_llm.Completion)
    assert "".join(d for d, _ in items[:-1]) == final.text
    assert [t for _, ids in items[:-1] for t in ids] == final.token_ids
    assert final.token_ids == lm.generate("hello 你好", chat=True, max_new_tokens=12,
                                          ignore_eos=True).token_ids


def test_logprobs_on_both_backends_are_the_models(tiny_dir):
    """Each generated token's logprob (and the best alternatives) equals the
    log-softmax of the Keras model's logits at that position."""
    lm, directory = tiny_dir
    prompt = lm.encode("hello")
    for backend in ("litert", "xla"):
        model = keras_llm.load(directory, backend=backend, progress=False)
        params = SamplingParams(max_new_tokens=4, temperature=0.8, seed=2, logprobs=3,
                                ignore_eos=True)
        [result] = model.engine.generate([prompt], params)
        assert len(result.logprobs) == len(result.token_ids) == 4
        ids = prompt + result.token_ids
        logits = lm.model(tf.constant([ids], tf.int32)).numpy()[0].astype(np.float64)
        for step, entry in enumerate(result.logprobs):
            row = logits[len(prompt) - 1 + step]
            expected = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
            assert entry.token_id == result.token_ids[step]
            np.testing.assert_allclose(entry.logprob, expected[entry.token_id], atol=2e-3)
            best = np.argsort(-expected)[:3]
            assert [i for i, _ in entry.top] == best.tolist(), backend
            np.testing.assert_allclose([lp for _, lp in entry.top], expected[best], atol=2e-3)
        # Without logprobs the same request gives the same tokens.
        [plain] = model.engine.generate([prompt], SamplingParams(
            max_new_tokens=4, temperature=0.8, seed=2, ignore_eos=True))
        assert plain.token_ids == result.token_ids and plain.logprobs is None
    with pytest.raises(InvalidParams, match="at most 20"):
        SamplingParams(logprobs=21).validate()
    with pytest.raises(InvalidParams, match=">= 0"):
        SamplingParams(logprobs=-1).validate()


def test_cancelled_requests_leave_the_queue_at_once(tiny_dir):
    lm, _ = tiny_dir
    engine = Engine(XLABackend.from_model(lm.model, max_slots=2), lm.host_tokenizer,
                    EngineConfig(max_slots=2, max_queue=2, max_length=64))
    params = SamplingParams(max_new_tokens=2)
    queued = [engine.submit([5, 6], params) for _ in range(4)]  # 2 slots' worth + 2 queued
    with pytest.raises(QueueFull):
        engine.submit([5, 6], params)
    queued[1].cancel()
    assert engine.stats()["waiting"] == 3  # gone before any step ran
    assert queued[1].finished and queued[1].result.finish_reason == "cancelled"
    queued.append(engine.submit([5, 6], params))  # its place is free again
    for job in queued:
        engine._wait(job)  # pylint: disable=protected-access
    assert [j.result.finish_reason for j in queued].count("cancelled") == 1
    assert engine.stats() == {"running": 0, "decoding": 0, "prefilling": 0, "waiting": 0}


def test_engine_refuses_what_does_not_fit(tiny_dir):
    lm, _ = tiny_dir
    engine = Engine(XLABackend.from_model(lm.model, max_slots=2), lm.host_tokenizer,
                    EngineConfig(max_slots=2, max_length=64))
    for ids, params, message in (([], SamplingParams(), "empty"),
                                 ([10 ** 6], SamplingParams(), "token ids"),
                                 ([1] * 60, SamplingParams(max_new_tokens=10), "limit of 64"),
                                 ([1], SamplingParams(top_p=0.0), "top_p")):
        with pytest.raises(InvalidRequest, match=message):
            engine.submit(ids, params)


# ----- artifact cache ----------------------------------------------------------------


def test_litert_file_is_built_once_reused_and_rebuilt_on_change(tiny_dir, tmp_path):
    lm, _ = tiny_dir
    directory = str(tmp_path / "m")
    saving.save_model_dir(directory, lm.model, lm.tokenizer, {"source": "tiny"})
    assert artifacts.cached_litert(directory, "float32") is None
    first = keras_llm.load(directory, progress=False)
    first.generate("hello", max_new_tokens=2)
    paths = artifacts.cached_litert(directory, "float32")
    path = paths[0]
    assert os.path.dirname(path) == os.path.join(directory, "litert")
    # One file for every step (the prefills, decode for 1, 4, 16, the verify
    # step of speculative decoding; the tiny model's 256-position context
    # leaves no shorter cache), the manifest, and XNNPACK's packed weights.
    listing = sorted(os.listdir(os.path.dirname(path)))
    assert listing[:2] == ["float32.json", "float32.tflite"] and len(listing) == 3
    cache = os.path.join(directory, "litert", listing[2])
    assert cache == weights_cache_path(path)
    assert set(first.engine.backend.runner.signatures) == {
        "prefill", "prefill_s64", "verify", "decode_b1", "decode_b4", "decode_b16"}
    # Eight signatures, one packed copy of the weights between them.
    weights = sum(w.numpy().nbytes for w in lm.model.weights)
    assert weights < os.path.getsize(cache) < 1.5 * weights
    built, packed = os.stat(path).st_mtime_ns, os.stat(cache).st_mtime_ns
    again = keras_llm.load(directory, progress=False)
    again.generate("hello", max_new_tokens=2)
    assert os.stat(path).st_mtime_ns == built and os.stat(cache).st_mtime_ns == packed  # reused
    # One short answer allocates one step's buffers: its prompt ran through
    # the decode step.
    runner = again.engine.backend.runner
    assert [k for k, s in runner.signatures.items() if s.allocated] == ["decode_b1"]
    long_prompt = "hello world " * 6  # past SHORT_PROMPT tokens: the prefill step
    assert again.generate(long_prompt, max_new_tokens=3).token_ids == lm.generate(
        long_prompt, max_new_tokens=3).token_ids
    assert runner.first_chunk.allocated  # one call's worth: the short-cache prefill
    assert not runner.signatures["prefill"].allocated
    # A changed model (here: the weights file rewritten) makes the files stale.
    # Half-written caches of a process that died are removed when the next
    # one is written; a live process's is not.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = {pid: f"{weights_cache_path(path)}.{pid}.partial" for pid in (dead.pid, os.getpid())}
    for leftover in leftovers.values():
        with open(leftover, "wb") as handle:
            handle.write(b"half")
    os.utime(os.path.join(directory, saving.MODEL_FILE), ns=(built + 10 ** 9, built + 10 ** 9))
    assert artifacts.cached_litert(directory, "float32") is None
    keras_llm.load(directory, progress=False).generate("hello", max_new_tokens=2)
    assert artifacts.cached_litert(directory, "float32") == paths
    assert os.stat(path).st_mtime_ns != built
    assert not os.path.exists(leftovers[dead.pid]) and os.path.exists(leftovers[os.getpid()])
    os.remove(leftovers[os.getpid()])
    # the old packed weights made way for the new file's
    assert [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".xnnpack")] == [
        os.path.basename(weights_cache_path(path))]
    with open(path.replace(".tflite", ".json"), encoding="utf-8") as handle:
        assert json.load(handle)["key"]["precision"] == "float32"


def test_a_failed_conversion_leaves_no_file(tiny_dir, tmp_path, monkeypatch):
    from keras_llm import litert

    lm, _ = tiny_dir
    directory = str(tmp_path / "m")
    saving.save_model_dir(directory, lm.model, lm.tokenizer, {"source": "tiny"})

    def broken(parsed):
        raise RuntimeError("converter died")

    monkeypatch.setattr(litert, "fuse_model", broken)
    with pytest.raises(RuntimeError, match="converter died"):
        artifacts.build_litert(directory, lm.model, lm.tokenizer, "float32", progress=False)
    assert os.listdir(os.path.join(directory, "litert")) == []
    # "auto" falls back to XLA and still answers.
    fallback = keras_llm.load(directory, progress=False)
    assert fallback.generate("hello", max_new_tokens=3).token_ids == lm.generate(
        "hello", max_new_tokens=3).token_ids
    assert fallback.engine.backend.capabilities.name == "xla"


# ----- cold start ---------------------------------------------------------------------


def test_the_litert_route_never_imports_tensorflow(tiny_dir):
    lm, directory = tiny_dir
    keras_llm.load(directory, progress=False).generate("hello", max_new_tokens=2)  # build once
    expected = lm.generate("hello", max_new_tokens=8).token_ids
    script = (
        "import sys, json, keras_llm\n"
        f"lm = keras_llm.load({directory!r})\n"
        "ids = lm.generate('hello', max_new_tokens=8).token_ids\n"
        "print(json.dumps({'ids': ids, 'tf': 'tensorflow' in sys.modules,"
        " 'keras': 'tf_keras' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=300, check=True)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record == {"ids": expected, "tf": False, "keras": False}
    cli = subprocess.run([sys.executable, "-m", "keras_llm.cli", "generate", "--model", directory,
                          "--prompt", "hello", "--max-new-tokens", "8", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=True)
    assert json.loads(cli.stdout)["token_ids"] == expected
    assert cli.stderr == ""  # no native log lines, no warnings
