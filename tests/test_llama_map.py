"""A user's hand-written Llama mapped onto `build_llama` (keras_llm.llama_map):
the same logits, the weight-name map, and refusals when it computes
something else."""

import numpy as np
import pytest
import tensorflow as tf

import keras_llm
from keras_llm.config import LlamaConfig
from keras_llm.llama_map import BLOCK, to_llama
from keras_llm.models import build_llama, config_from_model
from tests import user_layers


def _logits(model, ids):
    return np.asarray(tf.cast(model(tf.constant(ids), training=False), tf.float32))


def test_hand_written_llama_maps_with_its_own_logits():
    user = user_layers.small_llama(vocab_size=96, hidden=32, num_layers=3, num_heads=4,
                                   num_kv_heads=2, intermediate=48, seed=4)
    fast = to_llama(user)
    config = config_from_model(fast)
    assert (config.num_layers, config.num_query_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_dim, config.tie_word_embeddings) == \
        (3, 4, 2, 8, 48, False)
    ids = np.random.default_rng(1).integers(0, 96, size=(3, 40)).astype(np.int32)
    np.testing.assert_allclose(_logits(fast, ids), _logits(user, ids), atol=1e-4)


def test_wrong_hyperparameters_are_refused_by_the_probe():
    user = user_layers.small_llama(seed=5)
    with pytest.raises(ValueError, match="differ by up to"):
        to_llama(user, rope_theta=500000.0)


@pytest.mark.parametrize("build", [user_layers.builtin_gpt, user_layers.mini_gpt])
def test_models_that_are_not_llamas_are_refused(build):
    with pytest.raises(ValueError, match="weights"):
        to_llama(build())


def test_explicit_weight_map_by_name():
    """A model whose weights are named: the documented map, one entry per
    keras-llm layer ({i} for the block)."""
    source = build_llama(LlamaConfig.named("tiny"), name="theirs")
    weight_map = {"token_embedding": "token_embedding/embeddings", "final_norm": "final_norm/scale"}
    names = {w.name.split(":")[0] for w in source.weights}
    for part in BLOCK:
        kind = "scale" if part.endswith("norm") else "kernel"
        weight_map[f"layer_{{i}}_{part}"] = f"layer_{{i}}_{part}/{kind}"
        assert f"layer_0_{part}/{kind}" in names, sorted(names)
    fast = to_llama(source, weight_map=weight_map, num_query_heads=4, num_key_value_heads=2,
                    rms_norm_epsilon=1e-5)
    ids = np.arange(30, dtype=np.int32).reshape(2, 15) % 300
    np.testing.assert_allclose(_logits(fast, ids), _logits(source, ids), atol=1e-5)
    with pytest.raises(ValueError, match="no weight 'nothing'"):
        to_llama(source, weight_map={**weight_map, "final_norm": "nothing"})


def test_language_model_decodes_a_mapped_llama_with_a_kv_cache():
    """In process without a source file: the XLA backend over the mapped
    model, with the user's predict loop's tokens."""
    user = user_layers.small_llama(seed=6)
    prompt = [3, 9, 27, 81 % 128, 5]
    lm = keras_llm.LanguageModel(user)
    [completion] = lm.generate_ids([prompt], max_new_tokens=16, stop_ids=())
    assert lm.engine.backend.capabilities.name == "xla"
    assert completion.token_ids == user_layers.greedy_predict(user, prompt, 16)
