"""The XLA backend under the engine: requests joining and leaving slots get the
tokens they get alone (greedy and seeded sampling), in process and from an
exported SavedModel's `engine` functions."""

import tensorflow as tf

from keras_llm.export.saved_model import export_model
from keras_llm.generation import Generator
from keras_llm.runtime.engine import Engine, EngineConfig
from keras_llm.runtime.params import SamplingParams
from keras_llm.runtime.xla import SlotDecoder, XLABackend
from tests.helpers import tiny_language_model, tiny_model

BUCKET = 16

REQUESTS = [  # (arrival step, prompt, max new tokens, temperature, seed)
    (0, [5, 6, 7], 12, 0.0, 0),
    (0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 4, 0.0, 0),
    (2, [42], 9, 0.8, 3),  # joins while others decode
    (3, [7, 7, 7, 7], 6, 0.0, 0),  # waits for a slot to be freed, reuses it
]


def run_schedule(engine, requests):
    """Submit each request at its arrival step of the engine's own scheduler."""
    pending, jobs, clock = list(enumerate(requests)), {}, 0
    while pending or any(not j.finished for j in jobs.values()):
        for item in [p for p in pending if p[1][0] <= clock]:
            pending.remove(item)
            rid, (_, prompt, new, temperature, seed) = item
            jobs[rid] = engine.submit(prompt, SamplingParams(max_new_tokens=new,
                                                             temperature=temperature, seed=seed))
        engine._run_once()  # pylint: disable=protected-access
        clock += 1
    return [jobs[i].result.token_ids for i in range(len(requests))]


def alone(model, requests):
    gen = Generator(model, prompt_bucket=BUCKET, cache_bucket=64)
    return [gen.generate([p], SamplingParams(max_new_tokens=n, temperature=t, seed=s))[0].token_ids
            for _, p, n, t, s in requests]


def test_slots_match_generation_alone():
    model = tiny_model(seed=3)
    backend = XLABackend.from_model(model, prompt_bucket=BUCKET, max_slots=3)
    engine = Engine(backend, None, EngineConfig(max_slots=3, max_length=64), stop_ids=())
    assert engine.num_slots == 3
    assert run_schedule(engine, REQUESTS) == alone(model, REQUESTS)


def test_allocate_reports_cache_bytes():
    model = tiny_model(seed=3)
    decoder = SlotDecoder(model)
    # 2 layers x (K, V) x 4 slots x 2 heads x 32 positions x 4 dims x 4 bytes
    assert int(decoder.allocate(tf.constant(4), tf.constant(32))) == 2 * 2 * 4 * 2 * 32 * 4 * 4
    assert decoder.cache[0][0].numpy().shape == (4, 2, 32, 4)


def test_engine_from_exported_savedmodel(tmp_path):
    lm = tiny_language_model(seed=5, merges=["h e"])
    path = export_model(lm, tmp_path, "tiny", max_new_tokens=8, progress=False, litert=None)
    loaded = tf.saved_model.load(path)
    backend = XLABackend(loaded.engine, lm.config.vocabulary_size, lm.config.context_length,
                         prompt_bucket=BUCKET, max_slots=2)
    engine = Engine(backend, None, EngineConfig(max_slots=2, max_length=64), stop_ids=())
    requests = [(0, [40, 41, 42], 8, 0.0, 0), (1, [70], 5, 0.7, 11)]
    assert run_schedule(engine, requests) == alone(lm.model, requests)
