"""TF-MOT pruning of keras-llm models (keras_llm.optimize.pruning)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from keras_llm.generation import Generator, SamplingParams
from keras_llm.models import config_from_model
from keras_llm.optimize import measure_sparsity, perplexity_and_fidelity, prune
from keras_llm.optimize.one_shot import inverse_cholesky, sparsegpt, wanda_mask
from keras_llm.optimize.pruning import _kernels_from_file, two_four_ok, wrap_for_pruning
from tests.helpers import random_token_batches, tiny_model

IDS = tf.constant([[5, 17, 42, 8, 99, 3]])


def _batches(seed=0, count=3, shape=(4, 17)):
    return random_token_batches(seed, count, shape)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def test_clone_handles_custom_layers_and_tied_embedding(model):
    wrapped = wrap_for_pruning(model, 0.5)
    # Before any mask is applied the wrapped clone computes the same logits.
    np.testing.assert_allclose(wrapped(IDS).numpy(), model(IDS).numpy(), rtol=0, atol=1e-6)
    embeddings = [l for l in wrapped.layers if l.name == "token_embedding"]
    assert len(embeddings) == 1 and len(embeddings[0].inbound_nodes) == 2  # lookup + reverse
    # The clone shares no variables with the original.
    original = {id(v) for v in model.weights}
    assert not original & {id(v) for v in wrapped.weights}


def test_one_shot_unstructured_reaches_target_and_survives_save(model, tmp_path):
    before = model(IDS).numpy()
    pruned = prune(model, target_sparsity=0.5)
    np.testing.assert_array_equal(model(IDS).numpy(), before)  # original untouched
    report = measure_sparsity(pruned)
    assert len(report["layers"]) == 2 * 7
    for name, entry in report["layers"].items():
        assert abs(entry["sparsity"] - 0.5) <= 1 / 64, name
    assert pruned.get_layer("token_embedding").get_weights()[0].all()  # not pruned
    assert config_from_model(pruned) == config_from_model(model)

    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    on_disk = measure_sparsity(path)
    assert on_disk["zeros"] == report["zeros"] and on_disk["overall"] >= 0.49
    loaded = tf.keras.models.load_model(path)
    from_file = _kernels_from_file(path)
    for layer_name, kernel in from_file.items():
        np.testing.assert_array_equal(kernel, loaded.get_layer(layer_name).kernel.numpy())
    np.testing.assert_array_equal(loaded(IDS).numpy(), pruned(IDS).numpy())


def test_two_four_with_fine_tune_and_update_pruning_step(model, tmp_path):
    steps = 4
    pruned, info = prune(model, structure="2:4", fine_tune_data=_batches(), steps=steps,
                         learning_rate=1e-3, return_info=True)
    assert info["callback_reached"] == sorted(info["wrappers"])
    assert len(info["wrappers"]) == 14
    for name in info["wrappers"]:
        assert info["steps_after"][name] - info["steps_before"][name] == steps, name
    report = measure_sparsity(pruned)
    assert report["two_four"] and report["overall"] == 0.5
    # Training moved the surviving weights.
    new = pruned.get_layer("layer_0_mlp_up").kernel.numpy()
    old = model.get_layer("layer_0_mlp_up").kernel.numpy()
    assert not np.allclose(new[new != 0], old[new != 0])
    path = str(tmp_path / "pruned24.keras")
    pruned.save(path)
    assert measure_sparsity(path)["two_four"]
    assert measure_sparsity(tf.keras.models.load_model(path))["two_four"]


def test_polynomial_schedule_reaches_target(model):
    pruned, info = prune(model, target_sparsity=0.7, schedule="polynomial",
                         fine_tune_data=_batches(1), steps=8, return_info=True)
    assert set(info["steps_after"].values()) == {8}
    for name, entry in measure_sparsity(pruned)["layers"].items():
        assert abs(entry["sparsity"] - 0.7) <= 1 / 64, name


def test_two_four_checker():
    kernel = np.ones([8, 3], np.float32)
    assert not two_four_ok(kernel)
    kernel[0::4] = 0
    kernel[1::4] = 0
    assert two_four_ok(kernel)
    kernel[1, 2] = 1.0
    assert not two_four_ok(kernel)


def test_pruned_model_generates_and_fidelity_is_sensible(model):
    pruned = prune(model, target_sparsity=0.5)
    generator = Generator(pruned, prompt_bucket=8, cache_bucket=32)
    [result] = generator.generate([[5, 17, 42]], SamplingParams(max_new_tokens=5))
    ids = [5, 17, 42]
    for _ in range(5):  # greedy without the cache gives the same tokens
        ids.append(int(np.argmax(pruned(tf.constant([ids]))[0, -1])))
    assert result.token_ids == ids[3:]

    batches = _batches(2, count=2, shape=(2, 12))
    same = perplexity_and_fidelity(model, model, batches)
    assert same["mean_kl"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["perplexity"] == pytest.approx(same["reference_perplexity"])
    assert same["positions"] == 2 * 2 * 11
    other = perplexity_and_fidelity(pruned, model, batches)
    assert other["mean_kl"] > 0.0 and 0.0 <= other["top1_agreement"] < 1.0
    assert np.isfinite(other["perplexity"]) and other["perplexity"] > 1.0


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="2:4"):
        prune(model, target_sparsity=0.6, structure="2:4")
    with pytest.raises(ValueError, match="structure"):
        prune(model, structure="4:8")
    with pytest.raises(ValueError, match="fine_tune_data"):
        prune(model, schedule="polynomial")


def _layer_problem(seed=0, rows=24, cols=64, tokens=512):
    """A kernel and inputs with correlated features of very different
    scales (as an LLM's hidden states have)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(rows, cols)).astype(np.float32)
    mixing = rng.normal(size=(cols, cols)) * 0.3 + np.eye(cols)
    x = (rng.normal(size=(tokens, cols)) @ mixing) * np.exp(rng.normal(size=cols))
    return weight, (x.T @ x) / tokens


def _output_error(weight, pruned, h):
    delta = weight - pruned
    return float(np.einsum("oi,ij,oj->", delta, h, delta))


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_and_wanda_move_the_layer_output_less_than_magnitude(structure):
    weight, h = _layer_problem()
    magnitude = np.where(wanda_mask(weight, np.ones(weight.shape[1]), 0.5, structure), 0, weight)
    wanda = np.where(wanda_mask(weight, np.diag(h), 0.5, structure), 0, weight)
    obs = sparsegpt(weight, *inverse_cholesky(h), 0.5, structure, block_size=16)
    for pruned in (magnitude, wanda, obs):
        assert np.sum(pruned == 0) == weight.size // 2
        if structure == "2:4":
            assert two_four_ok(pruned.T)
    errors = [_output_error(weight, p, h) for p in (magnitude, wanda, obs)]
    # Scaling by the input norm helps; compensating the removed weights
    # with the kept ones (SparseGPT) helps again.
    assert errors[1] < 0.5 * errors[0] and errors[2] < 0.8 * errors[1], errors


def test_sparsegpt_with_nothing_to_prune_changes_nothing_and_skips_dead_inputs():
    weight, h = _layer_problem(1, rows=8, cols=16)
    np.testing.assert_allclose(sparsegpt(weight, *inverse_cholesky(h), 0.0, "unstructured"),
                               weight, rtol=0, atol=1e-5)
    h[3, :] = h[:, 3] = 0.0  # an input that is always zero
    pruned = sparsegpt(weight, *inverse_cholesky(h), 0.5, "unstructured", block_size=8)
    assert np.all(pruned[:, 3] == 0) and np.sum(pruned == 0) >= weight.size // 2


@pytest.mark.parametrize("method, structure", [("sparsegpt", "unstructured"),
                                               ("wanda", "2:4")])
def test_calibrated_pruning_keeps_its_zeros_through_fine_tune(model, method, structure):
    calibration = np.random.default_rng(4).integers(0, 300, (6, 16))
    before = model(IDS).numpy()
    one_shot, info = prune(model, 0.5, structure, method=method, calibration_ids=calibration,
                           return_info=True)
    np.testing.assert_array_equal(model(IDS).numpy(), before)  # original untouched
    assert info["one_shot"]["method"] == method and info["one_shot"]["tokens"] == 6 * 16
    assert 0.0 < info["one_shot"]["relative_error"] < 1.0
    report = measure_sparsity(one_shot)
    assert all(entry["sparsity"] == 0.5 for entry in report["layers"].values())
    assert report["two_four"] == (structure == "2:4")
    tuned, info = prune(model, 0.5, structure, method=method, calibration_ids=calibration,
                        fine_tune_data=_batches(), steps=3, learning_rate=1e-2,
                        return_info=True)
    assert len(info["loss"]) == 1
    for layer in one_shot.layers:
        if layer.name.endswith(("_query", "_mlp_down")):
            kept, trained = layer.kernel.numpy(), tuned.get_layer(layer.name).kernel.numpy()
            np.testing.assert_array_equal(trained == 0, kept == 0)  # the same mask
            assert not np.allclose(trained, kept)  # and it did train
    with pytest.raises(ValueError, match="calibration_ids"):
        prune(model, 0.5, method="wanda")
    with pytest.raises(ValueError, match="method"):
        prune(model, 0.5, method="obs", calibration_ids=calibration)


def test_sparse_storage_is_exact_smaller_and_densifies(model, tmp_path):
    import zipfile  # pylint: disable=import-outside-toplevel

    from keras_llm import saving  # pylint: disable=import-outside-toplevel
    from keras_llm.optimize import cast_model  # pylint: disable=import-outside-toplevel

    pruned = prune(model, 0.5)
    dense, sparse = str(tmp_path / "dense.keras"), str(tmp_path / "sparse.keras")
    pruned.save(dense)
    saving.save_sparse(pruned, sparse)
    assert zipfile.ZipFile(sparse).namelist().count(saving.WEIGHTS_SPARSE) == 1
    loaded = saving.load_model(sparse)
    for a, b in zip(loaded.weights, pruned.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Projections are about half the tiny model's weights; half of them are
    # zeros, kept as one bit each.
    projections = sum(layer.kernel.shape.num_elements() for layer in loaded.layers
                      if layer.name.startswith("layer_") and hasattr(layer, "kernel"))
    saved = os.path.getsize(dense) - os.path.getsize(sparse)
    assert saved >= 4 * projections * 0.5 - 4096, (saved, projections)
    assert measure_sparsity(sparse)["zeros"] == measure_sparsity(dense)["zeros"]
    plain = saving.densify(sparse, str(tmp_path / "plain.keras"))
    np.testing.assert_array_equal(tf.keras.models.load_model(plain)(IDS).numpy(),
                                  pruned(IDS).numpy())
    # bfloat16 weights (tf_keras's opaque 2-byte data) come back bit for bit.
    half = cast_model(pruned, "bfloat16")
    saving.save_sparse(half, str(tmp_path / "half.keras"))
    back = saving.load_model(str(tmp_path / "half.keras"))
    np.testing.assert_array_equal(back(IDS).numpy(), half(IDS).numpy())
    # float32 values exact in bfloat16 are stored in 2 bytes, losslessly.
    rounded = tf.cast(tf.cast(model.get_layer("token_embedding").embeddings, tf.bfloat16),
                      tf.float32)
    from keras_llm.optimize._common import clone_with  # pylint: disable=import-outside-toplevel

    model_copy = clone_with(model, lambda fresh, original: None)
    model_copy.get_layer("token_embedding").embeddings.assign(rounded)
    saving.save_sparse(model_copy, str(tmp_path / "narrow.keras"))
    again = saving.load_model(str(tmp_path / "narrow.keras"))
    np.testing.assert_array_equal(again.get_layer("token_embedding").embeddings.numpy(),
                                  rounded.numpy())
