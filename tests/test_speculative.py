"""Speculative decoding on tiny models: a draft guesses, the original checks
in one verify step, and the output is the original's own token for token."""

import numpy as np
import pytest

import keras_llm
from keras_llm import saving
from keras_llm.runtime.engine import Engine, EngineConfig
from keras_llm.runtime.params import SamplingParams
from keras_llm.runtime.xla import XLABackend
from tests.helpers import tiny_language_model

PROMPTS = ["hello", "hello world, hello", "he"]
SAMPLED = dict(temperature=0.9, top_k=40, seed=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The original (seed 8) and an unrelated draft (seed 9) with the same
    tokenizer, each saved as a model directory."""
    base = tmp_path_factory.mktemp("speculative")
    dirs = []
    for seed in (8, 9):
        lm = tiny_language_model(seed=seed)
        directory = base / f"tiny{seed}"
        saving.save_model_dir(directory, lm.model, lm.tokenizer, {"source": "tiny"})
        dirs.append(str(directory))
    return dirs


def load(directory, **options):
    return keras_llm.load(directory, backend="litert", progress=False, **options)


def test_verify_gives_the_decode_steps_logits_and_rewinds(models):
    backend = load(models[0]).engine.backend
    assert backend.capabilities.verify_length == 8
    prompt = [5, 70, 71, 72]
    backend.prefill(prompt, 0)
    tokens = [80, 81, 82, 83, 84]
    stepped = np.stack([backend.step(np.array([t], np.int32), [0])[1][0] for t in tokens])
    backend.rewind(0, len(prompt))
    checked = backend.verify(tokens, 0)
    np.testing.assert_allclose(checked, stepped, atol=1e-4)
    # Keep two of them, then go on with another token: as if the rest never ran.
    backend.rewind(0, len(prompt) + 2)
    backend.verify([90], 0)
    backend.prefill(prompt + tokens[:2] + [90], 1)  # a fresh sequence in another slot
    _, both = backend.step(np.array([91, 91], np.int32), [0, 1])
    np.testing.assert_allclose(both[0], both[1], atol=1e-4)
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        backend.verify(list(range(9)), 0)
    with pytest.raises(ValueError, match="cannot keep"):
        backend.rewind(0, 10 ** 4)


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_speculative_output_is_the_originals(models, sampling):
    original, other = models
    plain = load(original)
    expected = [plain.generate(p, max_new_tokens=29, ignore_eos=True, **sampling).token_ids
                for p in PROMPTS]
    # The model itself as its draft: every guess is kept. An unrelated model
    # and the model's int8 weights: some guesses are rejected; the tokens are
    # the original's all the same.
    for draft, tokens in ((original, 4), (other, 3), ("int8", 7)):
        fast = load(original, draft=draft, speculative_tokens=tokens)
        got = [fast.generate(p, max_new_tokens=29, ignore_eos=True, **sampling).token_ids
               for p in PROMPTS]
        assert got == expected, draft
        stats = fast.engine.speculator.stats()
        assert stats["calls"] > 0 and stats["proposed"] > 0
        # each call yields its kept guesses plus one token of the original's own
        assert stats["accepted"] + stats["calls"] <= sum(len(t) for t in expected) - len(PROMPTS)
        if draft == original:
            assert stats["acceptance_rate"] == 1.0
            assert stats["calls"] <= sum(-(-(len(t) - 1) // (tokens + 1)) for t in expected)
        if draft == other:
            assert stats["acceptance_rate"] < 0.9


def test_speculation_keeps_stops_logprobs_and_batches(models):
    original, other = models
    plain, fast = load(original), load(original, draft=other)
    # a stop string and a length that is no multiple of the tokens per step
    options = dict(max_new_tokens=13, stop=("ll",), ignore_eos=True)
    for prompt in PROMPTS:
        a, b = plain.generate(prompt, **options), fast.generate(prompt, **options)
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    # logprobs come from the original's verify logits
    ids = plain.encode("hello")
    params = SamplingParams(max_new_tokens=9, logprobs=2, ignore_eos=True, **SAMPLED)
    [a], [b] = plain.engine.generate([ids], params), fast.engine.generate([ids], params)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose([x.logprob for x in a.logprobs], [x.logprob for x in b.logprobs],
                               atol=1e-4)
    # Requests decoding together step together; one alone speculates; the
    # tokens are the same either way.
    params = SamplingParams(max_new_tokens=21, ignore_eos=True)
    short = SamplingParams(max_new_tokens=5, ignore_eos=True)
    prompts = [plain.encode(p) for p in PROMPTS]
    before = fast.engine.speculator.calls
    jobs = [fast.engine.submit(prompts[0], params), fast.engine.submit(prompts[1], short)]
    for job in jobs:
        fast.engine._wait(job)  # pylint: disable=protected-access
    assert fast.engine.speculator.calls > before  # after the short one left
    assert [j.result.token_ids for j in jobs] == [
        plain.engine.generate([prompts[0]], params)[0].token_ids,
        plain.engine.generate([prompts[1]], short)[0].token_ids]


def test_speculation_needs_a_verify_step_and_the_same_vocabulary(models, tmp_path):
    original, _ = models
    lm = load(original)
    draft = lm.engine.backend
    xla = XLABackend.from_model(lm.model, max_slots=1)
    with pytest.raises(ValueError, match="verify step"):
        Engine(xla, None, EngineConfig(max_slots=1), draft=draft)
    bigger = tiny_language_model(seed=9, merges=("h e", "l l", "he ll", "o r"))
    directory = tmp_path / "bigger"
    saving.save_model_dir(directory, bigger.model, bigger.tokenizer, {"source": "tiny"})
    with pytest.raises(ValueError, match="same vocabulary|share the model's vocabulary"):
        load(original, draft=str(directory)).generate("hello", max_new_tokens=2)


def test_verify_moves_to_a_longer_cache_as_decode_steps_do(tmp_path):
    """Files with a 16-position verify and decode step beside the 64-position
    ones: a sequence that grows past 16 positions keeps the original's tokens."""
    from keras_llm import litert
    from keras_llm.runtime.litert import LiteRTBackend

    original, draft = tiny_language_model(seed=8), tiny_language_model(seed=9)
    files = [litert.convert(lm.model, str(tmp_path / f"{name}.tflite"), max_length=64,
                            batch_sizes=(1, 2), prefill_length=8, lengths=(16,),
                            verify_length=4, split=True)
             for name, lm in (("original", original), ("draft", draft))]
    assert any(f.endswith(".verify_s16.tflite") for f in files[0])
    prompts = [[5, 70, 71], [9, 9, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90]]
    for params in (SamplingParams(max_new_tokens=40, ignore_eos=True),
                   SamplingParams(max_new_tokens=40, ignore_eos=True, **SAMPLED)):
        plain = Engine(LiteRTBackend(files[0]), None, EngineConfig(max_slots=1), stop_ids=())
        fast = Engine(LiteRTBackend(files[0]), None,
                      EngineConfig(max_slots=1, speculative_tokens=3), stop_ids=(),
                      draft=LiteRTBackend(files[1]))
        for prompt in prompts:
            [a], [b] = plain.generate([prompt], params, text=False), fast.generate(
                [prompt], params, text=False)
            assert a.token_ids == b.token_ids and len(a.token_ids) == 40
        assert fast.speculator.calls > 0
        assert {sig.length for sig in fast.backend.runner.verifiers if sig.views} == {16, 64}


def test_server_speculates_with_a_draft_export(models, tmp_path):
    """`keras-llm serve --draft`: a real server on loopback, the draft from a
    second export; Generate streams and TF Serving Predict calls answer
    with the original's tokens, and the draft did the guessing."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from keras_llm.export.saved_model import export_model
    from keras_llm.serving.engine import EngineConfig as ServingConfig
    from keras_llm.serving.protos import generation_pb2, generation_pb2_grpc
    from keras_llm.serving.server import Server

    original, other = models
    plain = load(original)
    versions = {name: export_model(load(directory), tmp_path, name, max_new_tokens=12,
                                   progress=False)
                for name, directory in (("tiny", original), ("draft", other))}
    config = ServingConfig(max_slots=2, max_length=128, draft=str(versions["draft"]))
    server = Server({"tiny": str(tmp_path / "tiny")}, port=0, engine_config=config,
                    poll_seconds=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        engine = server.servables.lookup("tiny").engine.engine
        assert engine.speculator is not None
        before = engine.speculator.calls  # warm-up speculated once
        assert before > 0
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            text="hello", sampling=generation_pb2.SamplingOptions(max_new_tokens=20, seed=2,
                                                                  temperature=0.8))
        [summary] = [r.summary for r in stub.Generate(request, timeout=120)
                     if r.HasField("summary")]
        expected = plain.generate("hello", max_new_tokens=20, seed=2, temperature=0.8)
        assert list(summary.token_ids) == expected.token_ids
        predict = predict_pb2.PredictRequest()
        predict.model_spec.name = "tiny"
        predict.inputs["prompt"].CopyFrom(tf.make_tensor_proto(["hello world"]))
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict, timeout=120)
        [text] = tf.make_ndarray(response.outputs["text"]).tolist()
        assert text.decode("utf-8", "replace") == plain.generate("hello world",
                                                                 max_new_tokens=12).text
        assert engine.speculator.calls > before + 1
    finally:
        channel.close()
        server.drain(0)


def test_cli_generate_with_a_draft(models, capsys):
    import json

    from keras_llm import cli

    original, other = models
    runs = []
    for extra in ([], ["--draft", other, "--speculative-tokens", "3"]):
        assert cli.main(["generate", "--model", original, "--prompt", "hello world",
                         "--max-new-tokens", "17", "--json", *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    plain, fast = runs
    assert fast["token_ids"] == plain["token_ids"] and fast["text"] == plain["text"]
    assert "speculative" not in plain and fast["speculative"]["calls"] > 0
