"""SlotDecoder: requests joining and leaving slots get the tokens they get alone,
both in process and from an exported SavedModel."""

import numpy as np
import tensorflow as tf

from export.saved_model import export_model
from keras_llm.generation import Generator, SamplingParams
from keras_llm.slots import SlotDecoder
from tests.helpers import tiny_language_model, tiny_model

BUCKET = 16


def run_schedule(engine, requests, num_slots, max_length):
    """A minimal scheduler: each request `(arrival_step, prompt, max_new, temperature, seed)`
    takes the first free slot when it arrives; every step decodes all slots."""
    engine.allocate(tf.constant(num_slots), tf.constant(max_length))
    free, active, results, waiting = list(range(num_slots)), {}, {}, list(enumerate(requests))
    clock = 0
    while waiting or active:
        for item in [w for w in waiting if w[1][0] <= clock and free]:
            rid, (_, prompt, max_new, temperature, seed) = item
            if not free:
                break
            waiting.remove(item)
            slot = free.pop(0)
            ids = np.zeros([1, BUCKET], np.int32)
            ids[0, BUCKET - len(prompt):] = prompt
            token, _ = engine.prefill(tf.constant(ids), tf.constant([BUCKET - len(prompt)]),
                                      tf.constant(slot), tf.constant([temperature]),
                                      tf.constant([0]), tf.constant([1.0]), tf.constant([seed]))
            active[slot] = dict(rid=rid, start=BUCKET - len(prompt), out=[int(token[0])],
                                max_new=max_new, temperature=temperature, seed=seed)
        for slot in [s for s, a in active.items() if len(a["out"]) >= a["max_new"]]:
            row = active.pop(slot)
            results[row["rid"]] = row["out"]
            free.append(slot)
        if active:
            rows = [active.get(s) for s in range(num_slots)]
            pick = lambda key, default: [r[key] if r else default for r in rows]  # noqa: E731
            tokens = [r["out"][-1] if r else 0 for r in rows]
            index = [BUCKET + len(r["out"]) - 1 if r else 0 for r in rows]
            step = [len(r["out"]) if r else 0 for r in rows]
            nxt, _ = engine.decode(tf.constant(tokens), tf.constant(index),
                                   tf.constant(pick("start", 0)), tf.constant(step),
                                   tf.constant(pick("temperature", 0.0), tf.float32),
                                   tf.constant([0] * num_slots), tf.constant([1.0] * num_slots),
                                   tf.constant(pick("seed", 0)))
            for slot, row in active.items():
                row["out"].append(int(nxt[slot]))
        clock += 1
    return [results[i] for i in range(len(requests))]


REQUESTS = [  # (arrival step, prompt, max new tokens, temperature, seed)
    (0, [5, 6, 7], 12, 0.0, 0),
    (0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 4, 0.0, 0),
    (2, [42], 9, 0.8, 3),  # joins while others decode
    (3, [7, 7, 7, 7], 6, 0.0, 0),  # waits for a slot to be freed, reuses it
]


def alone(model, requests):
    gen = Generator(model, prompt_bucket=BUCKET, cache_bucket=64)
    return [gen.generate([p], SamplingParams(max_new_tokens=n, temperature=t, seed=s))[0].token_ids
            for _, p, n, t, s in requests]


def test_slots_match_generation_alone():
    model = tiny_model(seed=3)
    got = run_schedule(SlotDecoder(model), REQUESTS, num_slots=3, max_length=64)
    assert got == alone(model, REQUESTS)


def test_allocate_reports_cache_bytes():
    model = tiny_model(seed=3)
    engine = SlotDecoder(model)
    # 2 layers x (K, V) x 4 slots x 2 heads x 32 positions x 4 dims x 4 bytes
    assert int(engine.allocate(tf.constant(4), tf.constant(32))) == 2 * 2 * 4 * 2 * 32 * 4 * 4
    assert engine.cache[0][0].numpy().shape == (4, 2, 32, 4)


def test_engine_from_exported_savedmodel(tmp_path):
    lm = tiny_language_model(seed=5, merges=["h e"])
    model, tokenizer = lm.model, lm.tokenizer
    path = export_model(lm, tmp_path, "tiny", max_new_tokens=8, progress=False)
    loaded = tf.saved_model.load(path)
    requests = [(0, [40, 41, 42], 8, 0.0, 0), (1, [70], 5, 0.7, 11)]
    got = run_schedule(loaded.engine, requests, num_slots=2, max_length=64)
    # The generator stops at stop ids; compare up to the first one.
    stops = set(tokenizer.stop_ids)
    expected = alone(model, requests)
    for g, e in zip(got, expected):
        cut = next((i for i, t in enumerate(g) if t in stops), len(g))
        assert g[:cut] == e[:cut]
