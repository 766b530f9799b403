"""Generation on a tiny model: cache, batching, buckets, stop ids, streaming."""

import numpy as np
import pytest
import tensorflow as tf

from keras_llm.generation import Generator, SamplingParams
from tests.helpers import tiny_model

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, pad_id=0, prompt_bucket=16, cache_bucket=64)


def naive_greedy(model, prompt, n):
    """The starting document's way: the whole sequence through the model per token."""
    ids, out = list(prompt), []
    for _ in range(n):
        token = int(np.argmax(model(tf.constant([ids])).numpy()[0, -1]))
        out.append(token)
        ids.append(token)
    return out


def test_cached_greedy_equals_full_recompute(model, generator):
    for prompt in PROMPTS:
        [result] = generator.generate([prompt], SamplingParams(max_new_tokens=12))
        assert result.token_ids == naive_greedy(model, prompt, 12)
        assert result.finish_reason == "length"


def test_batch_gives_each_prompt_its_own_tokens(generator):
    params = SamplingParams(max_new_tokens=15)
    batch = generator.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, batch):
        assert result.token_ids == generator.generate([prompt], params)[0].token_ids


def test_batched_sampling_matches_alone(generator):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=5)
    batch = generator.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, batch):
        assert result.token_ids == generator.generate([prompt], params)[0].token_ids
    other = generator.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.9, seed=6))
    assert [r.token_ids for r in other] != [r.token_ids for r in batch]


def test_no_retrace_within_a_bucket(model):
    gen = Generator(model, prompt_bucket=16, cache_bucket=64)
    gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5))
    counts = (gen.prefill_fn.experimental_get_tracing_count(),
              gen.decode_fn.experimental_get_tracing_count())
    # Another prompt length, token count and sampling setup in the same buckets.
    gen.generate([[9, 8, 7, 6, 5, 4, 3]], SamplingParams(max_new_tokens=9, temperature=0.7, seed=3))
    assert (gen.prefill_fn.experimental_get_tracing_count(),
            gen.decode_fn.experimental_get_tracing_count()) == counts == (1, 1)
    # A longer prompt moves to the next bucket: exactly one new prefill trace.
    gen.generate([list(range(1, 20))], SamplingParams(max_new_tokens=5))
    assert gen.prefill_fn.experimental_get_tracing_count() == 2


def test_stop_ids_end_rows_independently(model, generator):
    free = generator.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    stop = free[1].token_ids[4]
    stopped = generator.generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_ids=(stop,)))
    first = free[1].token_ids.index(stop)
    assert stopped[1].token_ids == free[1].token_ids[:first]
    assert stopped[1].finish_reason == "stop"
    for free_row, row in zip(free, stopped):
        if stop not in free_row.token_ids:
            assert row.token_ids == free_row.token_ids


def test_streaming_yields_same_tokens(generator):
    params = SamplingParams(max_new_tokens=20)
    chunks = list(generator.stream([PROMPTS[0]], params))
    assert chunks[0].shape == (1, 1)  # the first token right after prefill
    streamed = np.concatenate(chunks, 1)[0].tolist()
    assert streamed == generator.generate([PROMPTS[0]], params)[0].token_ids


def test_edge_cases_and_errors(generator):
    assert generator.generate([[1, 2]], SamplingParams(max_new_tokens=0))[0].token_ids == []
    assert len(generator.generate([[1, 2]], SamplingParams(max_new_tokens=1))[0].token_ids) == 1
    with pytest.raises(ValueError, match="empty prompt"):
        generator.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="context length"):
        generator.generate([list(range(1, 250))], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate([[1]], SamplingParams(max_new_tokens=-1))
    with pytest.raises(ValueError, match="out of range"):
        generator.generate([[1, 100000]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        generator.generate([[1]], SamplingParams(temperature=1.0, top_p=0.0))


def test_generation_up_to_the_context_limit(model):
    gen = Generator(model, prompt_bucket=64, cache_bucket=256)
    prompt = list(range(1, 200))
    [result] = gen.generate([prompt], SamplingParams(max_new_tokens=56))
    assert len(result.token_ids) == 56
    assert result.token_ids[:8] == naive_greedy(model, prompt, 8)
