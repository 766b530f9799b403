"""The LiteRT decode path: conversion of the model's own call, the runner's
in-place cache, int8 weights, and the server's LiteRT backend."""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from keras_llm.export.saved_model import export_model
from keras_llm import litert
from keras_llm.generation import Generator, SamplingParams
from keras_llm.runtime.engine import InvalidRequest
from keras_llm.runtime.litert import LiteRTBackend
from keras_llm.models import find_layer
from keras_llm.serving.engine import EngineConfig, ExportedModel
from keras_llm.serving.server import Server
from tests.helpers import engine_greedy, tiny_language_model, tiny_model
from tests.test_serving import stream

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def float_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("litert") / "model.tflite"
    return litert.convert(model, str(path), batch_sizes=(1, 2, 4), max_length=MAX_LENGTH,
                          prefill_length=16)


@pytest.fixture(scope="module")
def runner(float_file):
    return litert.LiteRTRunner(float_file, num_threads=1)


def _greedy_reference(model, prompt, count):
    sequence = list(prompt)
    for _ in range(count):
        logits = model(tf.constant([sequence]), training=False).numpy()
        sequence.append(int(np.argmax(logits[0, -1])))
    return sequence[len(prompt):]


def test_signatures_and_shapes(runner):
    assert runner.batch_sizes == [1, 2, 4]
    assert (runner.max_length, runner.prefill_length, runner.num_layers) == (MAX_LENGTH, 16, 2)
    assert set(runner.signatures) == {"prefill", "prefill_s16", "decode_b1", "decode_b2",
                                      "decode_b4"}
    assert runner.first_chunk is runner.signatures["prefill_s16"]
    assert runner.first_chunk.length == 16 and runner.signatures["prefill"].length == MAX_LENGTH


def test_a_prompt_of_one_call_runs_on_the_short_cache_prefill(runner):
    """A prompt that fits in one prefill call has no past: it runs on
    `prefill_s16` (16 cache positions, not 64) with the full prefill's logits."""
    ids = list(range(3, 15))
    short = runner.prefill(ids)
    assert runner.first_chunk.allocated
    first, runner.first_chunk = runner.first_chunk, None
    try:
        np.testing.assert_allclose(runner.prefill(ids), short, atol=1e-5)
    finally:
        runner.first_chunk = first


def test_teacher_forced_logits_match_the_model_across_prefill_chunks(model, runner):
    ids = np.random.default_rng(0).integers(0, 200, size=(2, 37)).astype(np.int32)  # 3 chunks
    expected = model(tf.constant(ids), training=False).numpy()
    got = runner(ids)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_greedy_generation_matches_full_recompute_for_ragged_batches(model, float_file):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 200, n)) for n in (20, 3, 17)]  # decode_b4 for 3 rows
    tokens = engine_greedy(LiteRTBackend(float_file, num_threads=1), prompts, 12)
    for prompt, got in zip(prompts, tokens):
        assert got == _greedy_reference(model, prompt, 12)
    # Same prompt alone (decode_b1): the batch does not change a row's tokens.
    alone = engine_greedy(LiteRTBackend(float_file, num_threads=1), prompts[1:2], 12)
    assert alone[0] == tokens[1]


def test_generation_matches_the_xla_generator(model, float_file):
    prompts = [[5, 9, 14, 2, 77], [31, 8]]
    expected = Generator(model).generate(prompts, SamplingParams(max_new_tokens=10))
    tokens = engine_greedy(LiteRTBackend(float_file, num_threads=1), prompts, 10)
    assert tokens == [list(g.token_ids) for g in expected]


@pytest.fixture(scope="module")
def bucket_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("litert") / "buckets.tflite"
    litert.convert(model, str(path), batch_sizes=(1, 4), max_length=MAX_LENGTH,
                   prefill_length=16, lengths=(16, 32))
    return str(path)


@pytest.fixture(scope="module")
def bucket_runner(bucket_file):
    return litert.LiteRTRunner(bucket_file, num_threads=1)


def test_shorter_caches_are_signatures_of_their_own(bucket_runner):
    assert set(bucket_runner.signatures) == {
        "prefill", "prefill_s16", "decode_b1_s16", "decode_b1_s32", "decode_b1", "decode_b4_s16",
        "decode_b4_s32", "decode_b4"}
    assert bucket_runner.lengths == [16, 32, MAX_LENGTH]
    assert bucket_runner.decoder(3, 20) is bucket_runner.signatures["decode_b4_s32"]
    assert bucket_runner.decoder(1, 16) is bucket_runner.signatures["decode_b1_s16"]
    assert bucket_runner.decoder(1) is bucket_runner.signatures["decode_b1"]
    with pytest.raises(ValueError, match="cache positions exceed"):
        bucket_runner.decoder(1, MAX_LENGTH + 1)
    assert litert.default_lengths(448) == (128, 256) and litert.default_lengths(128) == ()


def test_generation_moves_through_shorter_caches_unchanged(model, bucket_file):
    # Positions 3..45 and 12..54: both rows cross the 16- and 32-slot caches.
    prompts = [[5, 9, 14], [31, 8, 2, 7, 1, 60, 3, 44, 19, 2, 5, 90]]
    expected = Generator(model).generate(prompts, SamplingParams(max_new_tokens=40))
    backend = LiteRTBackend(bucket_file, num_threads=1)
    tokens = engine_greedy(backend, prompts, 40)
    assert tokens == [list(g.token_ids) for g in expected]
    assert backend.active.length == MAX_LENGTH  # moved on from the 16- and 32-slot caches


def test_step_refuses_a_position_past_its_cache(bucket_runner):
    short = bucket_runner.signatures["decode_b1_s16"]
    with pytest.raises(ValueError, match="past 16 cache positions"):
        bucket_runner.step(short, np.array([1], np.int32), np.array([16], np.int32))


def test_limits_are_clear_errors(model, runner, float_file, tmp_path):
    with pytest.raises(ValueError, match="largest compiled decode batch"):
        runner.decoder(5)
    backend = LiteRTBackend(float_file, num_threads=1)
    # Five requests over a file whose largest batch is 4: one waits its turn.
    assert engine_greedy(backend, [[1]] * 5, 2, max_slots=8) == engine_greedy(
        LiteRTBackend(float_file, num_threads=1), [[1]], 2) * 5
    with pytest.raises(InvalidRequest, match="per-sequence limit of 64"):
        engine_greedy(backend, [[1] * 60], 10)
    with pytest.raises(ValueError, match="quantization"):
        litert.convert(model, str(tmp_path / "x.tflite"), quantization="int2")
    with pytest.raises(ValueError, match="lengths must be"):
        litert.convert(model, str(tmp_path / "x.tflite"), max_length=32, prefill_length=16,
                       lengths=(16, 32))
    with pytest.raises(FileNotFoundError):
        litert.LiteRTRunner(str(tmp_path / "missing.tflite"))
    assert not list(tmp_path.iterdir())


def test_smoothing_keeps_the_float_function(model):
    ids = np.random.default_rng(2).integers(0, 200, size=(2, 24)).astype(np.int32)
    smoothed = litert.smooth(model, ids, alpha=0.5)
    changed = [name for name in ("layer_0_attention_norm", "layer_0_mlp_up", "layer_1_query")
               if not np.allclose(smoothed.get_layer(name).get_weights()[0],
                                  model.get_layer(name).get_weights()[0])]
    assert changed == ["layer_0_attention_norm", "layer_0_mlp_up", "layer_1_query"]
    np.testing.assert_allclose(smoothed(tf.constant(ids)).numpy(),
                               model(tf.constant(ids)).numpy(), atol=1e-4)


def _fully_connected_ops(path, signature):
    model = flatbuffer_utils.read_model(path)
    index = next(d.subgraphIndex for d in model.signatureDefs
                 if d.signatureKey.decode() == signature)
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    return sum(codes[op.opcodeIndex] == schema.BuiltinOperator.FULLY_CONNECTED
               for op in model.subgraphs[index].operators)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_fused_projections_give_the_same_results(quantization, tmp_path):
    model = tiny_model(seed=5, hidden_dim=64, num_query_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_dim=128)
    ids = np.random.default_rng(6).integers(0, 200, size=(2, 21)).astype(np.int32)
    paths = {fuse: litert.convert(model, str(tmp_path / f"{fuse}.tflite"), quantization=quantization,
                                  batch_sizes=(1, 2), max_length=MAX_LENGTH, prefill_length=16,
                                  calibration_ids=ids, fuse=fuse)
             for fuse in (False, True)}
    layers = 2
    # query/key/value and gate/up each become one matmul: 7 per layer -> 4.
    assert _fully_connected_ops(paths[False], "decode_b1") == 7 * layers + 1
    assert _fully_connected_ops(paths[True], "decode_b1") == 4 * layers + 1
    # The stacked weights replace the originals and are stored once for all
    # signatures: a second copy would add all of them to the file.
    stacked = sum(int(np.prod(find_layer(model, f"layer_{i}_{name}").kernel.shape))
                  for i in range(layers) for name in ("query", "key", "value", "mlp_gate", "mlp_up"))
    stacked *= 1 if quantization == "int8" else 4
    growth = os.path.getsize(paths[True]) - os.path.getsize(paths[False])
    assert growth < stacked / 2
    runners = {fuse: litert.LiteRTRunner(path, num_threads=1) for fuse, path in paths.items()}
    np.testing.assert_array_equal(runners[True](ids), runners[False](ids))
    prompts = [list(ids[0, :9]), list(ids[1, :4])]
    assert (engine_greedy(LiteRTBackend(paths[True], num_threads=1), prompts, 24)
            == engine_greedy(LiteRTBackend(paths[False], num_threads=1), prompts, 24))


def _resident_bytes(path):
    """This process's resident bytes of its mappings of `path`."""
    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == real
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def test_released_file_pages_read_back_the_same(tmp_path):
    import mmap  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.litert import release_file_pages  # pylint: disable=import-outside-toplevel
    data = np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        assert view[::4096] == data[::4096]  # every page read: resident
        assert _resident_bytes(path) == len(data)
        assert release_file_pages(path) == len(data)
        assert _resident_bytes(path) == 0
        assert view[:] == data  # read back from the file, unchanged


def test_discard_zeroes_an_array_and_nothing_beside_it():
    from keras_llm.runtime.litert import discard  # pylint: disable=import-outside-toplevel
    whole = np.ones(1 << 20, np.float32)  # 4 MB: its own anonymous mapping
    inner = whole[1001:-1003]  # starts and ends inside a page
    discard(inner)
    assert not inner.any()
    assert whole[:1001].all() and whole[-1003:].all()
    inner[7] = 3.0  # handed-back pages are usable again
    assert whole[1008] == 3.0
    small = np.ones(100, np.float32)  # less than a page: written with zeros
    discard(small)
    assert not small.any()
    with pytest.raises(ValueError, match="C-contiguous"):
        discard(whole[::2])  # would zero a copy
    assert whole[:1001].all()


def _rss_bytes():
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


LONG_PROMPTS = [list(range(3 + i, 20 + 2 * i)) for i in range(8)]


@pytest.fixture(scope="module")
def long_cache(tmp_path_factory):
    """A model whose caches hold 2,048 positions x 8 rows (34 MB for the
    8-row step), its file, and its greedy ids for `LONG_PROMPTS`."""
    model = tiny_model(seed=5, head_dim=64, context_length=2048)
    path = litert.convert(model, str(tmp_path_factory.mktemp("litert") / "long.tflite"),
                          batch_sizes=(1, 8), max_length=2048, prefill_length=16, lengths=())
    expected = Generator(model).generate(LONG_PROMPTS, SamplingParams(max_new_tokens=24))
    return path, [list(g.token_ids) for g in expected]


def _caches_zero(runner, signatures=None, outputs=False):
    """Every allocated signature's keys/values (of `signatures`, default
    all), and with `outputs` its outputs, are zero."""
    chosen = runner.signatures.values() if signatures is None else signatures
    return all(not sig.views[name].any() for sig in chosen if sig.allocated
               for name in runner._cache_names  # pylint: disable=protected-access
               + (sig.output_names if outputs else []))


def test_cache_memory_follows_the_positions_written(long_cache):
    # 8 sequences of about 40 positions take a few percent of the 8-row
    # cache, and the 1-row cache the batch moved off is handed back, zeroed,
    # its outputs too, and so are the prefill's after each prompt.
    path, expected = long_cache
    backend = LiteRTBackend(path, num_threads=1)
    runner = backend.runner
    big = runner.signatures["decode_b8"]
    cache_bytes = sum(4 * int(np.prod(big.shape(name))) for name in runner._cache_names)  # pylint: disable=protected-access
    assert cache_bytes > 30 << 20
    before = _rss_bytes()
    tokens = engine_greedy(backend, LONG_PROMPTS, 24)
    grown = _rss_bytes() - before
    assert tokens == expected
    assert backend.active is big
    assert grown < 0.25 * cache_bytes, (grown, cache_bytes)  # 100% when the caches were zeroed by writing
    one_row = runner.signatures["decode_b1"]  # moved off: its caches and outputs handed back
    assert one_row.allocated and _caches_zero(runner, [one_row], outputs=True)
    prefill = runner.signatures["prefill"]  # its logits handed back after each prompt
    assert prefill.allocated and _caches_zero(runner, [prefill], outputs=True)
    assert big.views["logits"].any()  # the running batch's own are kept


def test_an_idle_engine_hands_its_cache_memory_back(long_cache):
    from keras_llm.runtime.engine import Engine, EngineConfig as RuntimeConfig  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.params import SamplingParams as Params  # pylint: disable=import-outside-toplevel
    path, expected = long_cache
    backend = LiteRTBackend(path, num_threads=1)
    engine = Engine(backend, None, RuntimeConfig(max_slots=8), stop_ids=()).start()
    try:
        for _ in range(2):  # and it answers the same after giving the memory back
            results = engine.generate(LONG_PROMPTS, Params(max_new_tokens=24), text=False)
            assert [r.token_ids for r in results] == expected
            deadline = time.monotonic() + 30  # the scheduler thread releases once idle
            while backend.active is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert backend.active is None and _caches_zero(backend.runner, outputs=True)
            assert backend.runner.signatures["prefill"].allocated  # its logits were handed back
    finally:
        engine.stop()


def test_int8_weights_are_not_held_twice(tmp_path):
    # XNNPACK computes with its packed copy (the weights cache): the file's
    # own int8 pages that compiling read are let go (120 MB for SmolLM2).
    model = tiny_model(seed=3, hidden_dim=256, num_query_heads=4, num_key_value_heads=2,
                       head_dim=64, intermediate_dim=1024)
    ids = np.random.default_rng(4).integers(0, 200, size=(1, 24)).astype(np.int32)
    path = litert.convert(model, str(tmp_path / "int8.tflite"), quantization="int8",
                          batch_sizes=(1,), max_length=MAX_LENGTH, prefill_length=16,
                          calibration_ids=ids)
    expected = litert.LiteRTRunner(path, num_threads=1)(ids)  # packs the weights cache
    # a later process, as a server or the CLI: maps the packed weights
    script = ("import sys, numpy as np\n"
              "from keras_llm.runtime.litert import LiteRTRunner\n"
              "from tests.test_litert import _resident_bytes\n"
              "ids = np.array(%r, np.int32)\n"
              "runner = LiteRTRunner(sys.argv[1], num_threads=1)\n"
              "print(_resident_bytes(sys.argv[1]))\n"
              "np.save(sys.argv[2], runner(ids))\n" % ids.tolist())
    proc = subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "out.npy")],
                          capture_output=True, text=True, check=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
    # once compiled: 5% of the file here, 30% without the release (a
    # page read again later may come back in larger pieces, as the kernel maps)
    assert int(proc.stdout.split()[-1]) < 0.15 * os.path.getsize(path)


def test_int8_file_stores_int8_weights_and_follows_the_model(tmp_path):
    # Wide enough that every projection has the converter's minimum of 1,024
    # weights for int8 (smaller tensors stay float).
    model = tiny_model(seed=3, hidden_dim=64, num_query_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_dim=128)
    ids = np.random.default_rng(4).integers(0, 200, size=(1, 24)).astype(np.int32)
    paths = {q: litert.convert(model, str(tmp_path / f"{q}.tflite"), quantization=q,
                               batch_sizes=(1,), max_length=MAX_LENGTH, prefill_length=16,
                               calibration_ids=ids)
             for q in (None, "int8")}
    path = paths["int8"]
    interpreter = Interpreter(model_path=path)
    int8 = [t for t in interpreter.get_tensor_details() if t["dtype"] == np.int8]
    int8_values = sum(int(np.prod(t["shape"])) for t in int8)
    weights = sum(int(np.prod(w.shape)) for w in model.weights if len(w.shape) == 2)
    assert int8_values >= weights  # every projection and the embedding (shared by signatures)
    assert os.path.getsize(path) < 0.6 * os.path.getsize(paths[None])
    runner = litert.LiteRTRunner(path, num_threads=1)
    expected = model(tf.constant(ids)).numpy()
    got = runner(ids)
    relative = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert relative < 0.2


@pytest.fixture(scope="module")
def litert_server(tmp_path_factory):
    lm = tiny_language_model(seed=6)
    base = tmp_path_factory.mktemp("models")
    path = export_model(lm, base, "tiny", max_new_tokens=16, progress=False, warmup=False,
                        litert="float32", litert_batch_sizes=(1, 2, 4), litert_max_length=128,
                        litert_lengths=(24, 48))
    config = EngineConfig(max_slots=8, max_queue=8, max_length=128, prompt_bucket=16)
    srv = Server({"tiny": str(base / "tiny")}, port=0, engine_config=config, poll_seconds=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield lm, channel, srv, path
    channel.close()
    srv.drain(0)


def test_export_records_the_litert_file(litert_server):
    _, _, _, path = litert_server
    with open(os.path.join(path, "assets", "keras_llm.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    files = meta["litert"].pop("files")
    assert meta["litert"] == {"file": "assets.extra/litert/model.tflite", "precision": "float32",
                              "batch_sizes": [1, 2, 4], "max_length": 128, "lengths": [24, 48],
                              "verify_length": 8}
    # One file for every step.
    assert files == [meta["litert"]["file"]]
    assert all(os.path.isfile(os.path.join(path, f)) for f in files)
    runner = litert.LiteRTRunner([os.path.join(path, f) for f in files], num_threads=1)
    caches = ("_s24", "_s48", "")
    assert set(runner.signatures) == ({"prefill", "prefill_s64"} | {f"verify{s}" for s in caches}
                                      | {f"decode_b{b}{s}" for b in (1, 2, 4) for s in caches})


def test_server_uses_litert_and_matches_the_generator(litert_server):
    lm, channel, srv, _ = litert_server
    engine = srv.servables.lookup("tiny").engine
    backend = engine.engine.backend
    assert backend.capabilities.name == "litert" and engine.num_slots == 4  # capped by the file
    # More requests than slots (queued); prompts pad to 16 positions, so
    # 20 new tokens move each batch from the 24- to the 48-slot cache.
    prompts = [f"request number {i}" for i in range(7)]
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        results = list(pool.map(lambda p: stream(channel, text=p, max_new_tokens=20)[1], prompts))
    for prompt, summary in zip(prompts, results):
        assert list(summary.token_ids) == lm.generate(prompt, max_new_tokens=20).token_ids
    # (the engine hands the caches back once idle: `active` may be gone)
    assert backend.runner.signatures["decode_b4_s48"].allocated
    assert not backend.runner.signatures["decode_b4"].allocated


def test_server_litert_sampling_matches_generator(litert_server):
    lm, channel, _, _ = litert_server
    _, summary = stream(channel, text="hello", max_new_tokens=10, temperature=0.8, top_k=30,
                        top_p=0.9, seed=5)
    expected = lm.generate("hello", max_new_tokens=10, temperature=0.8, top_k=30, top_p=0.9, seed=5)
    assert list(summary.token_ids) == expected.token_ids


def test_litert_backend_requires_the_file(tmp_path):
    lm = tiny_language_model(seed=6)
    path = export_model(lm, tmp_path, "plain", max_new_tokens=8, progress=False, warmup=False,
                        litert=None)
    with pytest.raises(ValueError, match="no LiteRT file"):
        ExportedModel(path, EngineConfig(backend="litert"))


def test_split_files_hold_only_their_signatures_and_give_the_same_results(model, tmp_path):
    from keras_llm.litert_fusion import split_signatures

    whole = litert.convert(model, str(tmp_path / "whole.tflite"), batch_sizes=(1, 2),
                           max_length=MAX_LENGTH, prefill_length=16, lengths=(32,))
    paths = litert.convert(model, str(tmp_path / "split.tflite"), batch_sizes=(1, 2),
                           max_length=MAX_LENGTH, prefill_length=16, lengths=(32,), split=True)
    assert [os.path.basename(p) for p in paths] == [
        "split.tflite", "split.decode_b1_s32.tflite", "split.decode_b1.tflite",
        "split.decode_b2_s32.tflite", "split.decode_b2.tflite"]
    listed = {os.path.basename(p): set(Interpreter(model_path=p).get_signature_list())
              for p in paths}
    assert listed["split.tflite"] == {"prefill", "prefill_s16"}
    assert listed["split.decode_b1_s32.tflite"] == {"decode_b1_s32"}
    assert listed["split.decode_b2.tflite"] == {"decode_b2"}
    # A decode-only file carries the weights once, not the whole file's.
    assert os.path.getsize(paths[-1]) < 0.8 * os.path.getsize(whole)
    ids = np.random.default_rng(9).integers(0, 200, size=(2, 21)).astype(np.int32)
    split_runner = litert.LiteRTRunner(paths, num_threads=1)
    np.testing.assert_array_equal(split_runner(ids), litert.LiteRTRunner(whole, num_threads=1)(ids))
    prompts = [list(ids[0, :9]), list(ids[1, :4])]
    assert (engine_greedy(LiteRTBackend(paths, num_threads=1), prompts, 40)
            == engine_greedy(LiteRTBackend(whole, num_threads=1), prompts, 40))
    with open(whole, "rb") as handle:
        with pytest.raises(ValueError, match="no signatures"):
            split_signatures(handle.read(), [["decode_b9"]])


def test_fast_serializer_writes_the_same_bytes_as_tensorflows(float_file):
    from keras_llm.litert_fusion import _serialize

    with open(float_file, "rb") as handle:
        data = handle.read()
    parsed = flatbuffer_utils.read_model_from_bytearray(data)
    assert _serialize(parsed) == bytes(flatbuffer_utils.convert_object_to_bytearray(parsed))


def test_conversion_saves_only_the_weights_not_the_keras_model(model):
    # The converter writes the object it is given as a SavedModel; a tracked
    # Keras model there has every layer traced (half the conversion time).
    holder, functions = litert._step_functions(model, MAX_LENGTH, [1], 16)
    children = {name for name, _ in holder._trackable_children().items()}  # pylint: disable=protected-access
    assert children == {"weights"}
    assert len(holder.weights) == len(model.weights)
    assert set(functions) == {"decode_b1", "prefill", "prefill_s16"}


def test_conversion_reports_its_progress_in_stages_adding_up_to_one(model, tmp_path):
    steps = []
    paths = litert.convert(model, str(tmp_path / "m.tflite"), batch_sizes=(1, 2),
                           max_length=MAX_LENGTH, prefill_length=16, split=True,
                           progress=steps.append)
    # tracing, the converter, binding the weights, the fusion, then one
    # step per file written
    assert len(steps) == 4 + len(paths) == 7
    assert all(step > 0 for step in steps) and abs(sum(steps) - 1.0) < 1e-9


def _weight_buffers(path):
    parsed = flatbuffer_utils.read_model(path)
    return sorted(len(b.data) for b in parsed.buffers if b.data is not None and len(b.data) > 64)


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_weights_bound_after_conversion_give_the_converters_own_file(quantization, tmp_path):
    # The converter runs on a weight-free graph (weights as inputs) and the
    # weights are put in afterwards: the file must compute exactly what the
    # converter's own constant-weight file computes, with the same
    # operators and the same weight buffers (one per weight, shared by all
    # signatures; wide enough that int8 applies to the projections).
    model = tiny_model(seed=8, hidden_dim=64, num_query_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_dim=128)
    ids = np.random.default_rng(9).integers(0, 200, size=(2, 21)).astype(np.int32)
    options = dict(quantization=quantization, batch_sizes=(1, 2), max_length=MAX_LENGTH,
                   prefill_length=16, lengths=(32,), verify_length=4, calibration_ids=ids)
    holder, functions = litert._step_functions(model, MAX_LENGTH, [1], 16,
                                               weights=litert._weight_inputs(model))
    assert not holder._trackable_children()  # pylint: disable=protected-access
    assert not functions["decode_b1"].get_concrete_function().captured_inputs
    before = [w.numpy().copy() for w in model.weights]
    paths = {frozen: litert.convert(model, str(tmp_path / f"{frozen}.tflite"),
                                    freeze_weights=frozen, **options)
             for frozen in (False, True)}
    # int8/int4 smoothing of the bound weights happened on copies (the
    # frozen route smooths a copy of the model): the model is unchanged.
    for old, weight in zip(before, model.weights):
        np.testing.assert_array_equal(old, weight.numpy())
    bound, frozen = (flatbuffer_utils.read_model(paths[k]) for k in (False, True))
    assert ([d.signatureKey for d in bound.signatureDefs]
            == [d.signatureKey for d in frozen.signatureDefs])
    for a, b in zip(bound.signatureDefs, frozen.signatureDefs):
        assert sorted(e.name for e in a.inputs) == sorted(e.name for e in b.inputs)
        ops = [[(o.opcodeIndex, len(o.inputs)) for o in m.subgraphs[d.subgraphIndex].operators]
               for m, d in ((bound, a), (frozen, b))]
        codes = [sorted(_code_name(m, i) for i, _ in o) for m, o in zip((bound, frozen), ops)]
        assert codes[0] == codes[1]  # the same operators (their order may differ)
    assert _weight_buffers(paths[False]) == _weight_buffers(paths[True])
    runners = {k: litert.LiteRTRunner(p, num_threads=1) for k, p in paths.items()}
    np.testing.assert_array_equal(runners[False](ids), runners[True](ids))
    prompts = [list(ids[0, :9]), list(ids[1, :4])]
    assert (engine_greedy(LiteRTBackend(paths[False], num_threads=1), prompts, 24)
            == engine_greedy(LiteRTBackend(paths[True], num_threads=1), prompts, 24))


def _code_name(parsed, index):
    code = parsed.operatorCodes[index]
    return max(code.builtinCode, code.deprecatedBuiltinCode)

