"""TF-MOT pruning of keras-llm models (keras_llm.optimize.pruning)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_llm.generation import Generator, SamplingParams
from keras_llm.models import config_from_model
from keras_llm.optimize import measure_sparsity, perplexity_and_fidelity, prune
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
