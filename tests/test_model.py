"""The Functional model: config, saving (.keras, .h5), safe loading."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import keras_llm
from keras_llm.config import LlamaConfig
from keras_llm.layers import KVCacheContext
from keras_llm.models import build_llama, config_from_model
from keras_llm.saving import ModelFileError, UnsafeModelError
from tests.helpers import assert_saved_model_round_trip, tiny_model

IDS = np.array([[5, 17, 42, 7, 99, 3]], np.int32)


def test_config_validation_and_named_configs():
    assert LlamaConfig.named("tiny").query_groups == 2
    cfg = LlamaConfig.named("smollm2-135m")
    assert (cfg.num_layers, cfg.hidden_dim, cfg.num_key_value_heads) == (30, 576, 3)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="multiple"):
        LlamaConfig(100, 16, 1, 3, 2, 4, 32)
    with pytest.raises(ValueError, match="positive"):
        LlamaConfig(100, 16, 0, 4, 2, 4, 32)
    with pytest.raises(ValueError, match="unknown config"):
        LlamaConfig.named("nope")


def test_model_structure_is_tfmot_friendly():
    model = tiny_model()
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    # 7 projections per block, all plain Dense without bias.
    assert len(dense) == 7 * 2
    assert all(type(l) is keras.layers.Dense and not l.use_bias for l in dense)
    assert isinstance(model.get_layer("token_embedding"), keras.layers.Embedding)
    assert config_from_model(model) == LlamaConfig.named("tiny")
    assert model(IDS).shape == (1, 6, 300)


def test_untied_head_and_config_recovery():
    model = tiny_model(tie_word_embeddings=False)
    assert model.get_layer("lm_head").units == 300
    assert config_from_model(model).tie_word_embeddings is False


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    a = model(IDS).numpy()
    changed = IDS.copy()
    changed[0, -1] = 11
    b = model(changed).numpy()
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("tied", [True, False])
def test_save_and_tf_keras_load_model_identical(tmp_path, suffix, tied):
    model = tiny_model(tie_word_embeddings=tied)
    loaded = assert_saved_model_round_trip(model, str(tmp_path / f"m{suffix}"), IDS)
    assert config_from_model(loaded) == config_from_model(model)
    # The loaded model still generates with the cache.
    caches = KVCacheContext.allocate(1, 2, 2, 8, 4)
    with KVCacheContext(caches, 0, [0], last_position_only=False).active():
        np.testing.assert_allclose(loaded(IDS).numpy(), model(IDS).numpy(), atol=1e-5)


def _lambda_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))


def test_keras_file_with_lambda_refused_by_tf_keras_and_keras_llm(tmp_path):
    path = str(tmp_path / "lam.keras")
    _lambda_model().save(path)
    with pytest.raises(ValueError, match="Lambda"):
        tf.keras.models.load_model(path)
    with pytest.raises(UnsafeModelError, match="safe_mode=False"):
        keras_llm.load_model(path)
    assert keras_llm.load_model(path, safe_mode=False)(np.ones((1, 3))).numpy()[0, 0] == 2


def test_h5_file_with_lambda_refused_unless_opted_in(tmp_path):
    path = str(tmp_path / "lam.h5")
    _lambda_model().save(path)
    with pytest.raises(UnsafeModelError, match="Lambda"):
        keras_llm.load_model(path)
    assert keras_llm.load_model(path, safe_mode=False)(np.ones((1, 3))).numpy()[0, 0] == 2


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        keras_llm.load_model(tmp_path / "missing.keras")
    bad = tmp_path / "corrupt.keras"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ModelFileError, match="cannot load"):
        keras_llm.load_model(bad)
    bad_h5 = tmp_path / "corrupt.h5"
    bad_h5.write_bytes(b"\x89HDF garbage")
    with pytest.raises(ModelFileError):
        keras_llm.load_model(bad_h5)


def test_mixed_precision_model_keeps_logits_float32():
    model = build_llama(LlamaConfig.named("tiny"), dtype="mixed_bfloat16")
    out = model(IDS)
    assert out.dtype == tf.float32
    assert model.get_layer("layer_0_query").compute_dtype == "bfloat16"
