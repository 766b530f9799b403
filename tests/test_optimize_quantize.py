"""Int8 weight quantization of keras-llm models (keras_llm.optimize.quantize)."""

import zipfile

import h5py
import numpy as np
import pytest
import tensorflow as tf

from keras_llm.generation import Generator, SamplingParams
from keras_llm.models import config_from_model
from keras_llm.optimize import (QuantizedDense, dequantized_model, perplexity_and_fidelity,
                                qat_model, quantization_aware_fine_tune, quantize_kernel,
                                quantize_model, quantize_weights)
from keras_llm.optimize.quantize import float_model_from_qat
from tests.helpers import random_token_batches, tiny_model

IDS = tf.constant([[5, 17, 42, 8, 99, 3]])


def _batches(seed=0, count=2, shape=(2, 12)):
    return random_token_batches(seed, count, shape)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


def test_quantize_kernel_error_bounded_by_half_scale():
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, [32, 8]).astype(np.float32)
    kernel[:, 3] = 0.0  # an all-zero channel
    q, scale = quantize_kernel(kernel)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (8,)
    assert np.abs(q).max() == 127 and q.min() >= -127
    error = np.abs(kernel - q.astype(np.float32) * scale)
    assert np.all(error <= scale / 2 * (1 + 1e-6))
    assert np.all(q[:, 3] == 0)
    # Each channel's largest weight maps to +-127.
    np.testing.assert_array_equal(np.abs(q[:, [0, 1, 2, 4]]).max(axis=0), 127)


def test_quantize_weights_covers_projections_only(model):
    quantized = quantize_weights(model)
    assert len(quantized) == 14 and "token_embedding" not in quantized
    for name, (q, scale) in quantized.items():
        kernel = model.get_layer(name).kernel.numpy()
        assert q.shape == kernel.shape and q.dtype == np.int8
        assert np.all(np.abs(kernel - q * scale) <= scale / 2 * (1 + 1e-6))


def test_dequantized_and_int8_models_agree(model):
    float_q = dequantized_model(model)
    int8 = quantize_model(model)
    np.testing.assert_allclose(int8(IDS).numpy(), float_q(IDS).numpy(), atol=1e-4)
    assert sum(isinstance(l, QuantizedDense) for l in int8.layers) == 14
    assert config_from_model(int8) == config_from_model(model)


def test_int8_model_saves_int8_and_loads(model, tmp_path):
    int8 = quantize_model(model)
    path = str(tmp_path / "int8.keras")
    int8.save(path)
    with zipfile.ZipFile(path) as archive:
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5", "r") as h5:
        kernels = [np.asarray(h5["layers"][g]["vars"]["0"]) for g in h5["layers"]
                   if g.startswith("quantized_dense")]
    assert len(kernels) == 14 and all(k.dtype == np.int8 for k in kernels)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(IDS).numpy(), int8(IDS).numpy())
    np.testing.assert_array_equal(loaded.get_layer("layer_1_mlp_down").kernel.numpy(),
                                  int8.get_layer("layer_1_mlp_down").kernel.numpy())

    generator = Generator(loaded, prompt_bucket=8, cache_bucket=32)
    [result] = generator.generate([[5, 17, 42]], SamplingParams(max_new_tokens=4))
    ids = [5, 17, 42]
    for _ in range(4):
        ids.append(int(np.argmax(loaded(tf.constant([ids]))[0, -1])))
    assert result.token_ids == ids[3:]


def test_fidelity_of_int8_is_close_but_not_identical(model):
    batches = _batches()
    same = perplexity_and_fidelity(model, model, batches)
    assert same["mean_kl"] == 0.0 and same["top1_agreement"] == 1.0
    int8 = perplexity_and_fidelity(quantize_model(model), model, batches)
    assert 0.0 < int8["mean_kl"] < 0.05
    assert int8["top1_agreement"] >= 0.9
    assert int8["perplexity"] == pytest.approx(int8["reference_perplexity"], rel=0.1)


def test_qat_wrappers_match_dequantized_and_fine_tune(model):
    wrapped = qat_model(model)
    np.testing.assert_allclose(wrapped(IDS).numpy(), dequantized_model(model)(IDS).numpy(),
                               atol=1e-4)
    plain = float_model_from_qat(wrapped, model)
    np.testing.assert_array_equal(plain(IDS).numpy(), model(IDS).numpy())

    int8, trained = quantization_aware_fine_tune(model, _batches(1), steps=3,
                                                 learning_rate=1e-3)
    assert sum(isinstance(l, QuantizedDense) for l in int8.layers) == 14
    before = model.get_layer("layer_0_query").kernel.numpy()
    wrapper = trained.get_layer("quant_layer_0_query")
    [after] = [v.numpy() for v in wrapper.weights if v.name == "layer_0_query/kernel:0"]
    assert not np.allclose(before, after)
    q = int8.get_layer("layer_0_query")
    np.testing.assert_array_equal(q.kernel.numpy(), quantize_kernel(after)[0])
    np.testing.assert_allclose(int8(IDS).numpy(), trained(IDS).numpy(), atol=1e-3)


def test_prune_preserving_qat_keeps_zeros(model):
    from keras_llm.optimize import measure_sparsity, prune  # pylint: disable=import-outside-toplevel

    pruned = prune(model, 0.5)
    zeros = {name: layer["zeros"] for name, layer in measure_sparsity(pruned)["layers"].items()}
    batches = _batches(seed=3)
    kept, _ = quantization_aware_fine_tune(pruned, batches, steps=3, learning_rate=1e-2,
                                           preserve_zeros=True)
    lost, _ = quantization_aware_fine_tune(pruned, batches, steps=3, learning_rate=1e-2)
    for name, count in zeros.items():
        q_kept = kept.get_layer(name).kernel.numpy()
        original_zeros = pruned.get_layer(name).kernel.numpy() == 0
        assert q_kept.dtype == np.int8 and np.all(q_kept[original_zeros] == 0), name
        assert np.sum(q_kept == 0) >= count
    # Without the masks, training moves pruned weights away from zero.
    assert any(np.sum(lost.get_layer(n).kernel.numpy() == 0) < c for n, c in zeros.items())
