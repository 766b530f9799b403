"""Write tiny keras-hub `.keras` files and keras-hub's own outputs for them.

Needs Keras 3 and keras-hub (not keras-llm runtime dependencies):

    KERAS_BACKEND=torch /tmp/hfvenv/bin/python scripts/make_keras_hub_fixtures.py

Writes `tests/data/keras_hub/<arch>.keras` (random weights, fixed seeds) and
`<arch>.json`: a prompt, keras-hub's float32 logits for every position, and
16 greedy new tokens (argmax of a full forward pass per step).
"""

import json
import pathlib

import keras
import keras_hub
import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "keras_hub"
COMMON = dict(vocabulary_size=320, num_layers=2, num_query_heads=4, num_key_value_heads=2,
              hidden_dim=32, dtype="float32")
TASKS = {
    "llama": lambda: keras_hub.models.LlamaCausalLM(
        backbone=keras_hub.models.LlamaBackbone(**COMMON, intermediate_dim=64,
                                                rope_max_wavelength=10000,
                                                layer_norm_epsilon=1e-5),
        preprocessor=None),
    "gemma": lambda: keras_hub.models.GemmaCausalLM(
        backbone=keras_hub.models.GemmaBackbone(**{**COMMON, "num_key_value_heads": 1},
                                                intermediate_dim=128, head_dim=16,
                                                layer_norm_epsilon=1e-6),
        preprocessor=None),
}


def logits(task, ids):
    ids = np.asarray([ids], np.int32)
    out = task({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    return keras.ops.convert_to_numpy(out)[0]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 320, 11)]
    for seed, (arch, make) in enumerate(TASKS.items()):
        keras.utils.set_random_seed(seed)
        task = make()
        rng = np.random.default_rng(seed)
        weights = []
        for w in task.get_weights():
            if w.ndim == 1:  # norm scales (Gemma's are offsets from 1)
                weights.append((0.2 * rng.normal(size=w.shape) + (arch != "gemma")).astype(w.dtype))
            else:  # the embedding at unit scale, projections at about 1.5 / sqrt(fan in)
                scale = 1.0 if w.shape[0] == 320 else 0.25
                weights.append((rng.normal(size=w.shape) * scale).astype(w.dtype))
        task.set_weights(weights)
        task.save(OUT / f"{arch}.keras")
        tokens = list(prompt)
        for _ in range(16):
            tokens.append(int(np.argmax(logits(task, tokens)[-1])))
        record = {"keras_hub": keras_hub.__version__, "prompt": prompt,
                  "logits": [[round(float(v), 6) for v in row] for row in logits(task, prompt)],
                  "greedy": tokens[len(prompt):]}
        with open(OUT / f"{arch}.json", "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        print(arch, task.count_params(), "parameters")


if __name__ == "__main__":
    main()
