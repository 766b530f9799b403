"""Decode speed of several models side by side, in one process: the
original and the outputs of `keras-llm optimize`, measured as the optimize
report measures a row (same prompts from the evaluation text, through the
engine), with the repeats interleaved across models so machine noise hits
every model alike. Prints a table with each model's
ratio to the first one, and writes JSON.

Usage:
    python -m benchmarks.optimized_speed smollm2 /tmp/student /tmp/int8/model.tflite \\
        --output speed.json

A LiteRT file (told by its `TFL3` identifier) runs on the engine's LiteRT
backend; anything else is loaded with `keras_llm.load` and runs on the
backend it gets by default (its LiteRT file; XLA for 16-bit models).
"""

import argparse
import json
import statistics
import sys

import numpy as np


def _is_litert(path):
    try:
        with open(path, "rb") as handle:
            return handle.read(8)[4:8] == b"TFL3"
    except OSError:
        return False


def _generators(spec, threads):
    """`(label, generate)` for a model spec, `generate(prompts, n) -> tok/s`."""
    from keras_llm.optimize import report  # pylint: disable=import-outside-toplevel

    if _is_litert(spec):
        from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
        generate = report.engine_decode(LiteRTBackend(spec, num_threads=threads))
    else:
        import keras_llm  # pylint: disable=import-outside-toplevel
        lm = keras_llm.load(spec, progress=False, num_threads=threads)
        generate = report.engine_decode(lm.engine.backend)
    return lambda prompts, n: generate(prompts, n)["decode_tokens_per_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="preset, model directory or .tflite file; "
                        "the first is the baseline of the ratios")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="LiteRT threads")
    parser.add_argument("--output", default=None, help="JSON file to write")
    args = parser.parse_args(argv)

    import keras_llm  # pylint: disable=import-outside-toplevel
    from benchmarks.common import machine  # pylint: disable=import-outside-toplevel
    from keras_llm.optimize import evaluation  # pylint: disable=import-outside-toplevel

    tokenizer = keras_llm.load(args.models[0], progress=False).tokenizer \
        if not _is_litert(args.models[0]) else None
    if tokenizer is None:
        parser.error("the first model must be a preset or model directory (its tokenizer "
                     "makes the prompts)")
    ids = evaluation.eval_token_ids(tokenizer)
    p = args.prompt_tokens
    batches = [int(b) for b in args.batch_sizes.split(",")]
    prompts = {b: np.asarray([ids[i * p:(i + 1) * p] for i in range(b)], np.int32)
               for b in batches}
    models = {}
    for spec in args.models:
        print(f"[speed] loading and warming up {spec}", file=sys.stderr, flush=True)
        generate = _generators(spec, args.threads)
        for b in batches:
            generate(prompts[b], args.new_tokens)  # compile / warm up, not counted
        models[spec] = generate
    rates = {(spec, b): [] for spec in models for b in batches}
    for repeat in range(args.repeats):
        for spec, generate in models.items():
            for b in batches:
                rates[(spec, b)].append(generate(prompts[b], args.new_tokens))
        print(f"[speed] repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    base = args.models[0]
    rows = []
    for spec in models:
        row = {"model": spec}
        for b in batches:
            values = rates[(spec, b)]
            row[f"b{b}"] = {"median": statistics.median(values), "min": min(values),
                            "max": max(values), "n": len(values)}
            row[f"b{b}_ratio"] = statistics.median(values) / statistics.median(rates[(base, b)])
        rows.append(row)
    result = {"machine": machine(), "prompt_tokens": p, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "rows": rows}
    header = "| model | " + " | ".join(f"tok/s b{b} | x b{b}" for b in batches) + " |"
    print(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"TF {result['machine']['tensorflow']}; prompt {p}, {args.new_tokens} new tokens, "
          f"greedy; median of {args.repeats} (interleaved); ratio to {base}")
    print(header)
    print("|---|" + "---|---|" * len(batches))
    for row in rows:
        cells = " | ".join(f"{row[f'b{b}']['median']:.1f} | {row[f'b{b}_ratio']:.2f}x"
                           for b in batches)
        print(f"| {row['model']} | {cells} |")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
