"""Generation speed of keras-llm against the starting document's way.

Measures, on one model in one process: prefill tokens/s for a long prompt,
decode tokens/s at batch 1 and 16, and the starting document's way of
generating (`tf.keras.models.load_model('model.h5')`, then `predict` on the
whole sequence for every new token), and prints the ratio.

    python -m benchmarks.bench_generation --model smollm2 [--json out.json]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import keras_llm
from benchmarks.common import write_report, Timer, machine, prompt_ids, summarize


def bench_prefill(lm, length, repeats):
    gen = lm.generator
    ids, key_start, _, cache_length = gen._plan(  # pylint: disable=protected-access
        [prompt_ids(lm.tokenizer, length)], lm.sampling_params(max_new_tokens=1))
    tensors = gen._tensors(lm.sampling_params(max_new_tokens=1), 1)  # pylint: disable=protected-access
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    args = (tf.constant(ids), tf.constant(key_start), cache_length)
    token, *_ = gen.prefill_fn(*args, **tensors)  # compile
    rates = []
    for _ in range(repeats):
        with Timer() as t:
            token, *_ = gen.prefill_fn(*args, **tensors)
            int(token[0])
        rates.append(length / t.seconds)
    return summarize(rates)


def bench_decode(lm, batch, prompt_length, new_tokens, repeats):
    prompts = [prompt_ids(lm.tokenizer, prompt_length, offset=7 * b) for b in range(batch)]
    params = lm.sampling_params(max_new_tokens=new_tokens, stop_ids=())
    lm.generator.generate(prompts, params)  # compile
    rates, ttfts = [], []
    for _ in range(repeats):
        stats = {}
        lm.generator.generate(prompts, params, stats)
        rates.append(batch * stats["decode_steps"] / stats["decode_s"])
        ttfts.append(stats["time_to_first_token_s"])
    return summarize(rates), summarize(ttfts)


def bench_document_way(lm, prompt_length, new_tokens):
    """`load_model('model.h5')` then `predict` on the whole sequence per token."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.h5")
        lm.model.save(path)
        model = tf.keras.models.load_model(path, compile=False)
    ids = list(prompt_ids(lm.tokenizer, prompt_length))
    start = time.perf_counter()
    generated = []
    for _ in range(new_tokens):
        logits = model.predict(np.array([ids], np.int32), verbose=0)
        token = int(np.argmax(logits[0, -1]))
        ids.append(token)
        generated.append(token)
    seconds = time.perf_counter() - start
    return new_tokens / seconds, generated


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--baseline-tokens", type=int, default=32,
                        help="tokens the starting document's way generates (it is slow)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    lm = keras_llm.load(args.model)
    report = {"machine": machine(), "model": args.model, "settings": vars(args)}
    report["prefill_tokens_per_s"] = bench_prefill(lm, args.prefill_tokens, args.repeats)
    report["decode"] = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        rate, ttft = bench_decode(lm, batch, args.prompt_tokens, args.new_tokens, args.repeats)
        report["decode"][batch] = {"tokens_per_s": rate, "time_to_first_token_s": ttft}
    base_rate, base_tokens = bench_document_way(lm, args.prompt_tokens, args.baseline_tokens)
    ours = lm.generator.generate([prompt_ids(lm.tokenizer, args.prompt_tokens)],
                                 lm.sampling_params(max_new_tokens=args.baseline_tokens,
                                                    stop_ids=()))[0].token_ids
    report["document_way"] = {"tokens_per_s": base_rate, "same_tokens": ours == base_tokens}
    b1 = report["decode"].get(1, next(iter(report["decode"].values())))["tokens_per_s"]["median"]
    report["speedup_vs_document_way_batch1"] = b1 / base_rate

    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; TF {m['tensorflow']}, "
          f"Python {m['python']}, keras-llm {m['keras_llm']}")
    print(f"model: {args.model}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new "
          f"tokens, greedy; medians of {args.repeats} (min-max)")
    p = report["prefill_tokens_per_s"]
    print("| measurement | tokens/s |\n|---|---|")
    print(f"| prefill, {args.prefill_tokens}-token prompt | {p['median']:.0f} ({p['min']:.0f}-{p['max']:.0f}) |")
    for batch, row in report["decode"].items():
        r = row["tokens_per_s"]
        print(f"| decode, batch {batch} (aggregate) | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) |")
    print(f"| starting document's way (load_model + predict per token, "
          f"{args.baseline_tokens} tokens) | {base_rate:.2f} |")
    print(f"speed-up at batch 1 over the starting document's way: "
          f"{report['speedup_vs_document_way_batch1']:.1f}x "
          f"(same greedy tokens: {report['document_way']['same_tokens']})")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
