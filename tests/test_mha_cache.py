"""The KV-cache backend for a user's MultiHeadAttention LM
(keras_llm.runtime.mha_cache), with its attention at the top of a Functional
model or inside the user's own layers (keras.io's TransformerBlock): the
recompute backend's tokens, greedy and sampled, alone and batched, and
refusals where a cache would be wrong."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

from keras_llm.runtime.engine import Engine, EngineConfig
from keras_llm.runtime.litert import LiteRTBackend
from keras_llm.runtime.mha_cache import MHACacheBackend, check_cache, convert_litert, fixed_length
from keras_llm.runtime.params import SamplingParams
from keras_llm.runtime.recompute import RecomputeBackend
from tests import user_layers


def _engine(backend):
    return Engine(backend, None, EngineConfig(max_slots=4,
                                              max_length=backend.capabilities.max_length))


@pytest.fixture(scope="module", params=["builtin_gpt", "mini_gpt"])
def model(request):
    """The built-in-layers GPT (any length), and keras.io's, whose attention
    and position embedding sit inside its own layers (fixed input length)."""
    return getattr(user_layers, request.param)(vocab_size=128, maxlen=64, seed=7)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batched_tokens_equal_the_recompute_backend(model, temperature):
    """Prompts of different lengths joining one batch: every row gets what
    the recompute backend gives it (seeded sampling included)."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 128, size=n).tolist() for n in (3, 11, 6, 20, 1)]
    params = SamplingParams(max_new_tokens=24, temperature=temperature, seed=5, ignore_eos=True)
    cached = _engine(MHACacheBackend.from_model(model, max_slots=4)).generate(prompts, params)
    alone = _engine(RecomputeBackend.from_model(model, max_slots=4)).generate(prompts, params)
    assert [c.token_ids for c in cached] == [a.token_ids for a in alone]
    assert all(len(c.token_ids) == 24 for c in cached)


def test_greedy_equals_the_predict_loop(model):
    prompt = [4, 8, 15, 16, 23, 42]
    [completion] = _engine(MHACacheBackend.from_model(model)).generate(
        [prompt], SamplingParams(max_new_tokens=30, ignore_eos=True))
    fixed = model.inputs[0].shape[1]  # keras.io's loop pads to the model's input length
    assert completion.token_ids == user_layers.greedy_predict(model, prompt, 30, fixed)


@pytest.fixture(scope="module")
def litert_backend(model, tmp_path_factory):
    """The model converted with its KV cache for LiteRT (a 16-token prefill,
    so a 20-token prompt takes two chunks)."""
    path = str(tmp_path_factory.mktemp("mha_litert") / "model.tflite")
    convert_litert(model, path, max_length=64, batch_sizes=(1, 4), prefill_length=16)
    return LiteRTBackend(path)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_litert_file_gives_the_recompute_tokens(model, litert_backend, temperature):
    """The converted model on keras-llm's own LiteRT backend (the cache in
    its buffers): every row of a ragged batch gets the recompute backend's
    tokens."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 128, size=n).tolist() for n in (3, 11, 6, 20, 1)]
    params = SamplingParams(max_new_tokens=24, temperature=temperature, seed=5, ignore_eos=True)
    cached = _engine(litert_backend).generate(prompts, params)
    alone = _engine(RecomputeBackend.from_model(model, max_slots=4)).generate(prompts, params)
    assert [c.token_ids for c in cached] == [a.token_ids for a in alone]


def test_the_litert_file_passes_the_cache_check(model, litert_backend):
    check_cache(litert_backend, model, 24, fixed_length(model) is not None)
    litert_backend.release()


def test_conversion_refuses_what_the_cache_refuses(tmp_path):
    with pytest.raises(ValueError, match="called more than once"):
        convert_litert(_shared_attention_gpt(), str(tmp_path / "shared.tflite"), max_length=64)
    assert not (tmp_path / "shared.tflite").exists()


def test_the_user_layers_are_left_as_they_were(model):
    """The swapped calls live only while a step is traced: afterwards the
    model computes what it computed before."""
    ids = np.random.default_rng(0).integers(1, 128, size=(1, model.inputs[0].shape[1] or 16))
    before = model(ids, training=False).numpy()
    backend = MHACacheBackend.from_model(model)
    backend.prefill([1, 2, 3], 0)
    np.testing.assert_array_equal(model(ids, training=False).numpy(), before)
    swapped = [layer for layer in model.submodules
               if isinstance(layer, (layers.MultiHeadAttention, layers.Embedding))]
    assert swapped and not any("call" in vars(layer) for layer in swapped)


def _shared_attention_gpt():
    """One MultiHeadAttention layer called by two blocks (shared weights)."""
    keras.utils.set_random_seed(0)
    inputs = layers.Input(shape=(None,), dtype="int32")
    x = layers.Embedding(128, 32)(inputs) + layers.Embedding(64, 32)(_positions(inputs))
    attention = layers.MultiHeadAttention(2, 16)
    for _ in range(2):
        x = layers.LayerNormalization()(x + attention(x, x, use_causal_mask=True))
    return keras.Model(inputs, layers.Dense(128)(x))


def _positions(inputs):
    return tf.range(tf.shape(inputs)[1])


def _convolution_gpt():
    """Causal, but a causal Conv1D mixes each token with the two before it,
    which a one-token step does not see."""
    keras.utils.set_random_seed(0)
    inputs = layers.Input(shape=(None,), dtype="int32")
    x = layers.Embedding(128, 32)(inputs) + layers.Embedding(64, 32)(_positions(inputs))
    x = layers.Conv1D(32, 3, padding="causal")(x)
    x = layers.LayerNormalization()(x + layers.MultiHeadAttention(2, 16)(
        x, x, use_causal_mask=True))
    return keras.Model(inputs, layers.Dense(128)(x))


def _padding_mask_gpt():
    """Token 0 is padding (`mask_zero=True`), and the mask reaches the
    attention, which then ignores those keys: not what the cache computes."""
    keras.utils.set_random_seed(0)
    inputs = layers.Input(shape=(None,), dtype="int32")
    positions = layers.Embedding(64, 32)(tf.zeros_like(inputs) + _positions(inputs))
    x = layers.Add()([layers.Embedding(128, 32, mask_zero=True)(inputs), positions])
    x = layers.LayerNormalization()(x + layers.MultiHeadAttention(2, 16)(
        x, x, use_causal_mask=True))
    return keras.Model(inputs, layers.Dense(128)(x))


@pytest.mark.parametrize("build, why", [
    (lambda: user_layers.builtin_gpt(causal=False), "not causal"),
    (user_layers.small_llama, "no MultiHeadAttention"),
    (_shared_attention_gpt, "called more than once"),
    (_convolution_gpt, "differ from its own logits"),
    (_padding_mask_gpt, "padding mask"),
])
def test_models_a_cache_would_get_wrong_are_refused(build, why):
    with pytest.raises(ValueError, match=why):
        MHACacheBackend.from_model(build())


def test_prompt_past_the_position_embedding_is_refused(model):
    backend = MHACacheBackend.from_model(model)
    assert backend.capabilities.max_length == 64
    with pytest.raises(ValueError, match="limit of 64 positions"):
        backend.prefill(list(range(1, 61)), 0, reserve=8)
    backend.prefill(list(range(1, 64)), 0)
    backend.step([5], [0])  # the 64th position
    with pytest.raises(ValueError, match="limit of 64 positions"):
        backend.step([5], [0])
