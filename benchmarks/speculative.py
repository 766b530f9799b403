"""Speculative decoding against the original alone, on chat prompts.

    python -m benchmarks.speculative [--model smollm2] [--draft int4]
        [--tokens 5 7] [--new-tokens 128] [--rounds 3]

Each configuration runs in its own process (the original alone on its
default backend, LiteRT float32 for SmolLM2; the original with the draft at
each number of draft tokens; the draft alone, for reference), one after the
other within a round. A process answers every prompt greedily with the chat
template after one warm-up answer; its figure is decode tokens/s over all
prompts together (tokens after each answer's first, over the time they took),
and answer tokens/s (all tokens over the answers' whole time, first token
included).
The speculative answers must be the original's token for token. Prints one
JSON object: medians over rounds, ratios to the original alone, the draft's
acceptance rate, each configuration's peak memory (VmHWM).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

# Chat prompts written for this benchmark (none from a test set).
PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a cat sleeping in the sun.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the water cycle for a ten-year-old.",
    "How do I make a cup of tea?",
    "Name some animals that live in the ocean and say one thing about each.",
]


def run_one(args):
    """One configuration in this process."""
    import keras_llm  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.engine import Engine, EngineConfig  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.params import SamplingParams  # pylint: disable=import-outside-toplevel

    options = dict(progress=False, num_threads=args.threads, max_slots=1)
    if args.config.startswith("speculative="):
        options.update(draft=args.draft, speculative_tokens=int(args.config.split("=")[1]))
    lm = keras_llm.load(args.model, **options)
    engine = lm.engine
    if args.config == "draft-alone":
        from keras_llm.runtime import artifacts  # pylint: disable=import-outside-toplevel
        from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
        paths = artifacts.cached_litert(lm.source, args.draft)
        if paths is None:
            raise SystemExit(f"no {args.draft} LiteRT files yet: run a speculative round first")
        engine = Engine(LiteRTBackend(paths, num_threads=args.threads), lm.host_tokenizer,
                        EngineConfig(max_slots=1))
    answer = lambda prompt, count: engine.generate(  # noqa: E731
        [lm.encode(prompt, chat=True)], SamplingParams(max_new_tokens=count))[0]
    answer(PROMPTS[0], 16)  # warm-up
    speculator = engine.speculator
    before = speculator.stats() if speculator is not None else None
    tokens, steps, seconds, total, first, answers = 0, 0, 0.0, 0.0, [], []
    for prompt in PROMPTS:
        out = answer(prompt, args.new_tokens)
        answers.append(out.token_ids)
        tokens += len(out.token_ids)
        steps += max(len(out.token_ids) - 1, 0)
        seconds += out.decode_s
        total += out.total_s
        first.append(out.time_to_first_token_s)
    from benchmarks.common import process_status_kb  # pylint: disable=import-outside-toplevel
    peak = process_status_kb("VmHWM")
    result = {"decode_tokens_per_s": steps / seconds, "answer_tokens_per_s": tokens / total,
              "peak_rss_mb": peak // 1024,
              "time_to_first_token_s": statistics.median(first), "tokens": tokens,
              "answers": answers}
    if speculator is not None:
        stats = speculator.stats()
        proposed = stats["proposed"] - before["proposed"]
        accepted = stats["accepted"] - before["accepted"]
        calls = stats["calls"] - before["calls"]
        result.update(acceptance_rate=accepted / proposed if proposed else 0.0,
                      tokens_per_verify=(accepted + calls) / calls if calls else 0.0)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--draft", default="int4")
    parser.add_argument("--tokens", type=int, nargs="+", default=[5, 7],
                        help="draft tokens per verify step, one configuration each")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)  # one process's part
    args = parser.parse_args(argv)
    if args.config:
        print(json.dumps(run_one(args)))
        return 0
    configs = ["original"] + [f"speculative={k}" for k in args.tokens] + ["draft-alone"]
    runs = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name in configs:
            command = [sys.executable, "-m", "benchmarks.speculative", "--config", name,
                       "--model", args.model, "--draft", args.draft,
                       "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                                  check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    original = statistics.median(r["decode_tokens_per_s"] for r in runs["original"])
    summary = {}
    for name, results in runs.items():
        rate = statistics.median(r["decode_tokens_per_s"] for r in results)
        row = {"decode_tokens_per_s": round(rate, 2), "ratio": round(rate / original, 3),
               "answer_tokens_per_s": round(statistics.median(
                   r["answer_tokens_per_s"] for r in results), 2),
               "time_to_first_token_s": round(statistics.median(
                   r["time_to_first_token_s"] for r in results), 4),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
               "same_tokens_as_original": all(
                   r["answers"] == runs["original"][0]["answers"] for r in results),
               "tokens": results[0]["tokens"]}
        if "acceptance_rate" in results[0]:
            row["acceptance_rate"] = round(statistics.median(
                r["acceptance_rate"] for r in results), 3)
            row["tokens_per_verify"] = round(statistics.median(
                r["tokens_per_verify"] for r in results), 2)
        summary[name] = row
    from benchmarks.common import machine  # pylint: disable=import-outside-toplevel
    print(json.dumps({"machine": machine(), "draft": args.draft, "rounds": args.rounds,
                      "new_tokens": args.new_tokens, "prompts": len(PROMPTS),
                      "results": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
