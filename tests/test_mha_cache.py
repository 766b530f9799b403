"""The KV-cache backend for a user's Functional MultiHeadAttention LM
(keras_llm.runtime.mha_cache): the recompute backend's tokens, greedy and
sampled, alone and batched, and refusals where a cache would be wrong."""

import numpy as np
import pytest

from keras_llm.runtime.engine import Engine, EngineConfig
from keras_llm.runtime.mha_cache import MHACacheBackend
from keras_llm.runtime.params import SamplingParams
from keras_llm.runtime.recompute import RecomputeBackend
from tests import user_layers


def _engine(backend):
    return Engine(backend, None, EngineConfig(max_slots=4,
                                              max_length=backend.capabilities.max_length))


@pytest.fixture(scope="module")
def model():
    return user_layers.builtin_gpt(vocab_size=128, maxlen=64, seed=7)


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
    assert completion.token_ids == user_layers.greedy_predict(model, prompt, 30)


@pytest.mark.parametrize("build, why", [
    (user_layers.mini_gpt, "not MultiHeadAttention layers of the model itself"),
    (lambda: user_layers.builtin_gpt(causal=False), "causal self-attention"),
    (user_layers.small_llama, "not MultiHeadAttention layers"),
])
def test_models_a_cache_would_get_wrong_are_refused(build, why):
    with pytest.raises(ValueError, match=why):
        MHACacheBackend.from_model(build())


def test_prompt_past_the_position_embedding_is_refused(model):
    backend = MHACacheBackend.from_model(model)
    assert backend.capabilities.max_length == 64
    with pytest.raises(ValueError, match="limit of 64 positions"):
        backend.prefill(list(range(1, 61)), 0, reserve=8)
