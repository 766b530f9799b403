"""4-bit LiteRT weights: a Q4_1 file's own codes, what the .tflite holds, and
int4 through `keras-llm optimize`, the engine and the CLI."""

import json

import gguf
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

import keras_llm
from keras_llm import cli, litert
from keras_llm.litert_int4 import (BLOCK, block_codes, dequantize_int4, pack_int4,
                                   storage_scale, unpack_int4)
from keras_llm.optimize import run
from keras_llm.runtime.litert import LiteRTBackend
from tests.helpers import byte_level_tokenizer, engine_greedy, tiny_model

WIDE = dict(hidden_dim=64, num_query_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_dim=128)


def _on_q4_1_grid(model):
    """`model` with every projection kernel snapped to Q4_1 blocks (32 inputs
    per output), as weights imported from a Q4_1 GGUF are."""
    for weight in model.weights:
        if len(weight.shape) == 2 and "embedding" not in weight.name:
            kernel = weight.numpy().T  # (out, in): GGUF's row layout
            codes, scale, minimum = block_codes(kernel)
            rows = kernel.shape[0]
            snapped = (codes.reshape(rows, -1, BLOCK) * scale[..., None] + minimum[..., None])
            weight.assign(snapped.reshape(kernel.shape).T)
    return model


def _gguf_codes(kind, seed):
    """A random (48, 128) matrix quantized by `gguf` as `kind`, and
    `block_codes` of its dequantized weights, checked to rebuild them: the
    same levels per block, nothing rounded a second time."""
    weights = np.random.default_rng(seed).normal(0, 0.05, (48, 128)).astype(np.float32)
    quantized = gguf.quants.quantize(weights, kind)
    dequantized = gguf.quants.dequantize(quantized, kind)
    codes, scale, minimum = block_codes(dequantized)
    rebuilt = (codes.reshape(48, -1, BLOCK) * scale[..., None] + minimum[..., None])
    np.testing.assert_allclose(rebuilt.reshape(48, 128), dequantized, rtol=0, atol=1e-6)
    return quantized, codes, scale


def test_block_codes_are_a_q4_1_files_own():
    q4_1, codes, scale = _gguf_codes(gguf.GGMLQuantizationType.Q4_1, seed=0)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 15
    # The file's raw Q4_1 blocks: f16 scale, f16 minimum, 16 bytes of nibbles
    # (the block's first 16 codes in the low nibbles, the last 16 in the high).
    blocks = np.asarray(q4_1, np.uint8).reshape(-1, 20)
    nibbles = blocks[:, 4:]
    file_codes = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=1)
    np.testing.assert_array_equal(file_codes.reshape(48, 128), codes)
    np.testing.assert_allclose(blocks[:, :2].copy().view(np.float16)[:, 0].reshape(48, 4),
                               scale, rtol=1e-6)


def test_block_codes_keep_a_q4_0_files_levels():
    q4_0, codes, scale = _gguf_codes(gguf.GGMLQuantizationType.Q4_0, seed=1)
    # Q4_0's step is the file's scale even where a block does not reach level 15.
    file_scale = np.asarray(q4_0, np.uint8).reshape(-1, 18)[:, :2].copy().view(np.float16)
    np.testing.assert_allclose(scale, np.abs(file_scale[:, 0].astype(np.float32)).reshape(48, 4),
                               rtol=1e-5)
    assert codes.max(axis=1).min() < 15  # some rows never use the top level


def test_pack_unpack_and_dequantize():
    values = np.array([-8, 7, 0, -1, 3, -5, 1], np.int8)
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and len(packed) == 4
    assert packed[0] == (0x8 | (0x7 << 4))  # the first value in the low nibble
    np.testing.assert_array_equal(unpack_int4(packed, len(values)), values)
    codes = np.tile(np.arange(-8, 8, dtype=np.int8), (2, 4))  # (2, 64): two blocks a row
    scale = np.array([[0.5, 2.0], [1.0, 0.25]], np.float32)
    got = dequantize_int4(codes, scale)
    assert got[0, 0] == -4.0 and got[0, 32] == -16.0 and got[1, 63] == 7 * 0.25
    with pytest.raises(ValueError, match="multiple of the block size"):
        block_codes(np.zeros((2, 40), np.float32))


def _int4_tensors(path):
    """{weight name: (dequantized int4 weights, block offsets)} and the
    names of int8 weights, read from the flatbuffer."""
    model = flatbuffer_utils.read_model(path)
    graph = model.subgraphs[0]
    fully_connected = {i for i, c in enumerate(model.operatorCodes)
                       if max(c.builtinCode, c.deprecatedBuiltinCode)
                       == schema.BuiltinOperator.FULLY_CONNECTED}
    int4, int8 = {}, []
    for op in graph.operators:
        if op.opcodeIndex not in fully_connected:
            continue
        weights = graph.tensors[op.inputs[1]]
        name = weights.name.decode()
        if weights.type == schema.TensorType.INT8 and not name.endswith("/block_offsets"):
            int8.append(name)
        if weights.type != schema.TensorType.INT4:
            continue
        quantization = weights.quantization
        assert quantization.detailsType == schema.QuantizationDetails.BlockwiseQuantization
        assert quantization.details.blockSize == BLOCK
        rows, columns = (int(d) for d in weights.shape)
        scales = graph.tensors[quantization.details.scales]
        assert scales.type == schema.TensorType.FLOAT16
        scale = np.asarray(model.buffers[scales.buffer].data, np.uint8).view(np.float16)
        codes = unpack_int4(model.buffers[weights.buffer].data, rows * columns)
        offsets_tensor = next(graph.tensors[i] for i in _offset_inputs(graph, op))
        assert offsets_tensor.type == schema.TensorType.INT8
        offsets = np.asarray(model.buffers[offsets_tensor.buffer].data, np.uint8).view(np.int8)
        offsets = (offsets.reshape(rows, -1).astype(np.float32)
                   * np.asarray(offsets_tensor.quantization.scale, np.float32)[:, None])
        int4[name] = (dequantize_int4(codes.reshape(rows, columns),
                                      scale.reshape(rows, -1).astype(np.float32)), offsets)
    return int4, int8


def _offset_inputs(graph, int4_op):
    """The block-offset weights added to `int4_op`'s output."""
    result = int(int4_op.outputs[0])
    add = next(op for op in graph.operators if result in list(op.inputs))
    other = next(int(i) for i in add.inputs if int(i) != result)
    producer = next(op for op in graph.operators if other in list(op.outputs))
    return [int(producer.inputs[1])]


@pytest.fixture(scope="module")
def grid_model():
    return _on_q4_1_grid(tiny_model(seed=3, **WIDE))


@pytest.fixture(scope="module")
def int4_file(grid_model, tmp_path_factory):
    # No smoothing: the file's weights are then the model's own.
    return litert.convert(grid_model, str(tmp_path_factory.mktemp("int4") / "int4.tflite"),
                          quantization="int4", smooth_alpha=0, batch_sizes=(1, 2),
                          max_length=64, prefill_length=16)


def test_int4_file_holds_the_q4_1_weights_exactly(grid_model, int4_file):
    int4, int8 = _int4_tensors(int4_file)
    # query/key/value stacked into one matmul, gate/up into one: 4 per layer.
    assert len(int4) == 4 * 2 and len(int8) == 1  # the tied output projection is int8
    stored = sum(w.size for w, _ in int4.values())
    kernels = {w.name.split("/")[0]: w.numpy().T for w in grid_model.weights
               if len(w.shape) == 2 and "embedding" not in w.name}
    assert stored == sum(k.size for k in kernels.values())
    for layer in range(2):
        fused = next(v for name, v in int4.items() if f"layer_{layer}_mlp_gate" in name)
        gate_up = np.concatenate([kernels[f"layer_{layer}_mlp_gate"],
                                  kernels[f"layer_{layer}_mlp_up"]])
        down = next(v for name, v in int4.items() if f"layer_{layer}_mlp_down" in name)
        for (codes, offsets), kernel in ((fused, gate_up), (down, kernels[f"layer_{layer}_mlp_down"])):
            rows = kernel.shape[0]
            rebuilt = (codes.reshape(rows, -1, BLOCK) + offsets[..., None]).reshape(kernel.shape)
            _, scale, minimum = block_codes(kernel)
            # Exact but for the scale's bfloat16 rounding (at most 8 codes x 2^-9 of a
            # scale) and the offsets' 8 bits (half a step of each row's int8 scale).
            offset_step = np.abs(minimum + 8 * scale).max(axis=1, keepdims=True) / 127
            bound = (8 * np.abs(scale - storage_scale(scale).astype(np.float32))
                     + offset_step / 2 + 1e-6)
            error = np.abs(rebuilt - kernel).reshape(rows, -1, BLOCK).max(axis=-1)
            assert np.all(error <= bound)
            assert bound.mean() < 0.1 * scale.mean()


def test_block_smoothing_keeps_every_weight_on_its_grid(grid_model):
    ids = np.random.default_rng(5).integers(0, 200, size=(2, 24)).astype(np.int32)
    smoothed = litert.smooth(grid_model, ids, alpha=0.5, block=BLOCK)
    np.testing.assert_allclose(smoothed(tf.constant(ids)).numpy(),
                               grid_model(tf.constant(ids)).numpy(), rtol=1e-4, atol=1e-4)
    changed = 0
    for before, after in zip(grid_model.weights, smoothed.weights):
        if len(before.shape) != 2 or "embedding" in before.name:
            continue
        original, scaled = before.numpy().T, after.numpy().T
        changed += not np.allclose(original, scaled)
        codes, scale, minimum = block_codes(scaled)
        # The same codes: each block (and each up-projection row) scaled by one factor.
        np.testing.assert_array_equal(codes, block_codes(original)[0])
        rebuilt = codes.reshape(len(codes), -1, BLOCK) * scale[..., None] + minimum[..., None]
        np.testing.assert_allclose(rebuilt.reshape(scaled.shape), scaled, rtol=1e-5, atol=1e-6)
    assert changed == 2 * 6  # query, key, value, gate, up, down of both layers


def test_int4_file_follows_the_model(grid_model, int4_file, tmp_path):
    ids = np.random.default_rng(4).integers(0, 200, size=(1, 24)).astype(np.int32)
    expected = grid_model(tf.constant(ids)).numpy()
    got = litert.LiteRTRunner(int4_file, num_threads=1)(ids)
    # What is left is XNNPACK's 8-bit quantization of the activations.
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.15
    float_file = litert.convert(grid_model, str(tmp_path / "f.tflite"), batch_sizes=(1, 2),
                                max_length=64, prefill_length=16)
    assert 0 < len(open(int4_file, "rb").read()) < len(open(float_file, "rb").read())
    prompts = [list(ids[0, :9]), list(ids[0, 3:7])]
    tokens = engine_greedy(LiteRTBackend(int4_file, num_threads=1, dtype="int4"), prompts, 12)
    assert [len(t) for t in tokens] == [12, 12]


def test_optimize_int4_writes_a_model_the_engine_runs_in_int4(tmp_path, capsys):
    tokenizer = byte_level_tokenizer(["h e", "l l"])
    model = _on_q4_1_grid(tiny_model(seed=6, vocabulary_size=tokenizer.vocabulary_size, **WIDE))
    lm = keras_llm.LanguageModel(model, tokenizer, {"source": "test"})
    out = tmp_path / "out"
    report = run(lm, out, tmp_path / "r.json", quantize="int4", eval_tokens=128,
                 eval_sequence_length=64, speed=False, verbose=False)
    assert report["steps"] == ["int4"]
    assert [r["variant"] for r in report["rows"]] == ["original", "int4-litert"]
    row = report["rows"][-1]
    assert row["runtime"] == "litert-xnnpack" and row["dtype"].startswith("int4")
    assert 0 < row["mean_kl"] < 0.5
    metadata = json.loads((out / "keras_llm.json").read_text())
    assert metadata["quantization"] == "int4-blockwise-weights"
    int4, _ = _int4_tensors(str(out / "model.tflite"))
    assert int4
    loaded = keras_llm.load(str(out), progress=False)
    backend = loaded.engine.backend
    assert isinstance(backend, LiteRTBackend) and backend.capabilities.dtype == "int4"
    completion = loaded.generate("he", max_new_tokens=6)
    assert len(completion.token_ids) == 6
    # The CLI on the same directory answers with the same tokens.
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(out), "--prompt", "he", "--max-new-tokens", "6",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == completion.token_ids


def test_widths_off_the_block_size_fall_back_to_int8(tmp_path):
    # hidden 48: the query/key/value, gate/up and output-projection inputs are
    # no multiple of 32 (int8 per channel); the down projection's 64 are (int4).
    model = tiny_model(seed=1, hidden_dim=48, num_query_heads=3, num_key_value_heads=1,
                       head_dim=16, intermediate_dim=64)
    path = litert.convert(model, str(tmp_path / "h48.tflite"), quantization="int4",
                          batch_sizes=(1,), max_length=32, prefill_length=8)
    int4, int8 = _int4_tensors(path)
    assert sorted(name.split("/")[1] for name in int4) == ["layer_0_mlp_down", "layer_1_mlp_down"]
    assert len(int8) == 2 * 3 + 1  # fused q/k/v, attention output, fused gate/up; the head
    ids = np.array([[1, 2, 3, 4, 5]], np.int32)
    expected = model(tf.constant(ids)).numpy()
    got = litert.LiteRTRunner(path, num_threads=1)(ids)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.2
