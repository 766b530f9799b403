"""One-shot pruning methods side by side on one model: SparseGPT, Wanda and
magnitude, unstructured 50% and 2:4, no fine-tune. Each is scored as the
optimize report scores a row (perplexity, mean KL and top-1 against the
original on the evaluation text); the calibration text is the teacher's own
generations, as `keras-llm optimize` uses.

Usage:
    python -m benchmarks.pruning_methods --model smollm2 \\
        --methods sparsegpt,wanda,magnitude --structures unstructured,2:4 \\
        --calibration-tokens 16384 --sequence-length 128 --output pruning.json
"""

import argparse
import itertools
import json
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", default="sparsegpt,wanda,magnitude")
    parser.add_argument("--structures", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--cache", default=None, help="teacher-text cache directory")
    parser.add_argument("--output", default=None, help="JSON results")
    args = parser.parse_args(argv)

    import keras_llm  # pylint: disable=import-outside-toplevel
    from keras_llm.optimize import (  # pylint: disable=import-outside-toplevel
        evaluation, perplexity_and_fidelity, prune, teacher_text)

    lm = keras_llm.load(args.model)
    ids = teacher_text.teacher_token_stream(lm, args.calibration_tokens, cache_dir=args.cache,
                                            verbose=False)
    windows = len(ids) // args.sequence_length
    calibration = ids[:windows * args.sequence_length].reshape(windows, args.sequence_length)
    batches = evaluation.eval_batches(lm.tokenizer, args.eval_tokens, 256)
    original = perplexity_and_fidelity(lm.model, lm.model, batches)["perplexity"]
    results = {"model": args.model, "calibration": list(calibration.shape),
               "original_perplexity": original, "rows": []}
    print(f"original perplexity {original:.2f}; calibration {calibration.shape[0]} x "
          f"{calibration.shape[1]} tokens of teacher text", flush=True)
    for method, structure in itertools.product(args.methods.split(","),
                                               args.structures.split(",")):
        start = time.perf_counter()
        pruned, info = prune(lm.model, args.sparsity, structure, method=method,
                             calibration_ids=None if method == "magnitude" else calibration,
                             return_info=True)
        seconds = time.perf_counter() - start
        quality = perplexity_and_fidelity(pruned, lm.model, batches)
        row = {"method": method, "structure": structure, "prune_s": round(seconds, 1),
               "perplexity": quality["perplexity"],
               "ratio": quality["perplexity"] / original, "mean_kl": quality["mean_kl"],
               "top1_agreement": quality["top1_agreement"],
               "relative_error": (info.get("one_shot") or {}).get("relative_error")}
        results["rows"].append(row)
        print(f"{method:10s} {structure:12s} perplexity {row['perplexity']:9.2f} "
              f"({row['ratio']:.2f}x)  KL {row['mean_kl']:.3f}  top-1 "
              f"{row['top1_agreement']:.3f}  {seconds:.0f} s", flush=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
