"""A user's own causal LM: the engine against the user's own `model.predict`
greedy loop, at 32 new tokens.

The three models of `tests/user_layers.py` (keras.io mini GPT with custom
layers, the same from built-in layers, a hand-written Llama) at a bigger
config (hidden 256, 4 layers, vocabulary 8000, context 512), saved to
`.keras` and loaded back as a user would. Both sides produce the same tokens
(checked); the table gives the median wall time of `--repeats` runs after
one warm-up run each (the engine's XLA compilation or LiteRT conversion is
in the warm-up, and reported separately). Each model runs on the backend
`keras_llm.load` picks for it: the hand-written Llama maps onto keras-llm's
own Llama (`keras_llm.llama_map`) and decodes on LiteRT with a KV cache, the
two GPTs are converted to LiteRT with the cache in their MultiHeadAttention
layers (`runtime.mha_cache`; conversion in the first-run column). The
two GPTs also run on the generic path every causal LM can take (the
recompute backend: the whole sequence each step, no cache; its forward pass
on LiteRT, whose conversion is in the first-run column, or on XLA with
`--xla-generic`).

    python -m benchmarks.user_model [--repeats 3] [--new-tokens 32] [--prompt-length 32]
                                    [--size large|small]
                                    [--length-bucket N] [--xla-generic]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import keras_llm  # noqa: E402
from keras_llm.runtime.engine import Engine, EngineConfig  # noqa: E402
from tests import user_layers  # noqa: E402

CONFIG = dict(vocab_size=8000, maxlen=512, embed_dim=256, num_heads=4, ff_dim=1024, num_layers=4)
LLAMA = dict(vocab_size=8000, hidden=256, num_layers=4, num_heads=4, num_kv_heads=2,
             intermediate=768)
# `--size small`: the tests' own models (user_layers' defaults: hidden 32,
# 2 layers, vocabulary 128, context 64), the size the users tried.
SIZES = {"large": (CONFIG, LLAMA), "small": ({}, {})}


def models(size="large"):
    """`(name, model, fixed input length of the user's loop, vocabulary)` for
    the three models."""
    gpt, llama = SIZES[size]
    vocabulary = gpt.get("vocab_size", 128)
    fixed = gpt.get("maxlen", 64)
    yield (f"mini_gpt (custom layers, fixed {fixed} input)", user_layers.mini_gpt(**gpt), fixed,
           vocabulary)
    yield "builtin_gpt (built-in layers)", user_layers.builtin_gpt(**gpt), None, vocabulary
    yield ("small_llama (RMSNorm, rotary, GQA)", user_layers.small_llama(**llama), None,
           vocabulary)


def timed(function, repeats):
    """`(median seconds, first run's seconds, result)` of `function()`: one
    warm-up run, then `repeats` timed runs."""
    start = time.perf_counter()
    result = function()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--length-bucket", type=int, default=None,
                        help="the XLA recompute backend's length bucket (default: its own, 16)")
    parser.add_argument("--xla-generic", action="store_true",
                        help="run the generic path's forward pass with XLA, not LiteRT")
    parser.add_argument("--size", choices=sorted(SIZES), default="large",
                        help="the models' size (large: hidden 256, 4 layers, vocabulary 8000, "
                             "context 512; small: the tests' models)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="keras_llm_bench_") as tmp:
        os.environ["KERAS_LLM_HOME"] = tmp  # the throwaway models' LiteRT files
        for name, model, pad_to, vocabulary in models(args.size):
            prompt = np.random.default_rng(0).integers(1, vocabulary, args.prompt_length).tolist()
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            user = keras_llm.load_model(path)
            lm = keras_llm.load(path)
            baseline, _, reference = timed(
                lambda: user_layers.greedy_predict(user, prompt, args.new_tokens, pad_to),  # noqa: B023
                args.repeats)
            engine, first, completion = timed(
                lambda: lm.generate_ids([prompt], max_new_tokens=args.new_tokens)[0],  # noqa: B023
                args.repeats)
            backend = lm.engine.backend.capabilities.name
            if backend == "litert":  # which file: a Llama's, or a model's own with its cache
                backend += f" ({os.path.basename(lm.engine.backend.runner.path)[:-7]})"
            rows.append((name, backend, baseline, engine, first,
                         completion.token_ids == reference))
            if backend == "recompute" or "llama" in name:
                continue
            start = time.perf_counter()
            recompute = lm.recompute_backend(litert=not args.xla_generic)  # converts the forward pass to LiteRT
            setup = time.perf_counter() - start
            if args.length_bucket:
                recompute.length_bucket = args.length_bucket
            generic = Engine(recompute, None, EngineConfig(
                max_slots=1, max_length=recompute.capabilities.max_length))
            params = lm.sampling_params(max_new_tokens=args.new_tokens)
            engine, first, [result] = timed(
                lambda: generic.generate([prompt], params),  # noqa: B023
                args.repeats)
            backend = "recompute (generic, %s)" % ("LiteRT" if recompute.litert else "XLA")
            rows.append((name, backend, baseline, engine, setup + first,
                         result.token_ids == reference))
    print(f"\n{args.new_tokens} new tokens after a {args.prompt_length}-token prompt, batch 1, "
          f"median of {args.repeats} (CPU, {os.cpu_count()} cores)\n")
    print("| model | engine backend | user's predict loop s | engine s | speed-up | "
          "engine first run s (compiles) | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, backend, baseline, engine, first, same in rows:
        print(f"| {name} | {backend} | {baseline:.2f} | {engine:.3f} | {baseline / engine:.1f}x | "
              f"{first:.1f} | {same} |")
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
