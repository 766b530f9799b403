"""keras-llm against its competitors, side by side, in one run on one machine.

Every engine (see `benchmarks/engines.py`) runs in its own process on the same
model, prompts and token counts (32-token prompt, 128 new tokens, greedy, by
default): prefill tokens/s, time to first token (also for a 128-token prompt),
decode tokens/s at batch 1, aggregate tokens/s of batches and of 1, 4, 16
and 32 concurrent gRPC streams, end-to-end tokens/s at 256 new tokens, and
peak memory. Each figure is the median over repeats with min and max; ratios
compare every keras-llm engine with every competitor, and the issue's targets
are checked. Writes `results.json`, TensorBoard scalars (`tensorboard/`) and,
with `--profile`, a profiler trace of decode steps (TensorBoard's Profile tab).

    python -m benchmarks.suite [--model smollm2] [--engines a,b] [--repeats N]
        [--output DIR] [--profile] [--quick]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import machine, prompt_ids
from benchmarks.engines import Settings, describe, engines

LOWER_IS_BETTER = ("time_to_first_token", "peak_rss")
QUICK = dict(prompt_tokens=16, new_tokens=8, prefill_tokens=32, long_tokens=16,
             batch_sizes=(2,), streams=(1, 2), repeats=2)


def _ints(text):
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser):
    """The suite's flags (shared with `keras-llm bench`)."""
    names = list(engines())
    parser.add_argument("--model", default="smollm2",
                        help="preset name or model directory (as keras_llm.load takes)")
    parser.add_argument("--engines", default=",".join(names),
                        help=f"comma-separated, from: {', '.join(names)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (3)")
    parser.add_argument("--output", default="bench_out", help="directory for results.json, "
                        "tensorboard/ and logs/")
    parser.add_argument("--profile", action="store_true",
                        help="write a profiler trace of decode steps into tensorboard/")
    parser.add_argument("--quick", action="store_true",
                        help="small token counts and 2 repeats (a smoke test)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="32")
    parser.add_argument("--new-tokens", type=int, default=None, help="128")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="128")
    parser.add_argument("--long-tokens", type=int, default=None,
                        help="new tokens of the end-to-end run (256; 0 skips it)")
    parser.add_argument("--batch-sizes", type=_ints, default=None,
                        help="in-process batch sizes (16)")
    parser.add_argument("--streams", type=_ints, default=None,
                        help="concurrent gRPC streams (1,4,16,32)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for llama.cpp and LiteRT")
    parser.add_argument("--server-args", default="",
                        help="extra `keras-llm serve` flags, space-separated")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds each engine process may take")


def settings_from_args(args, work_dir, cache_dir):
    """Resolve flags (and `--quick`) into the `Settings` every engine gets."""
    defaults = dict(prompt_tokens=32, new_tokens=128, prefill_tokens=128, long_tokens=256,
                    batch_sizes=(16,), streams=(1, 4, 16, 32), repeats=3)
    if args.quick:
        defaults.update(QUICK)
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v
              for k, v in defaults.items()}
    if chosen["new_tokens"] < 2:
        raise ValueError("--new-tokens must be at least 2 (decode needs a second token)")
    if chosen["repeats"] < 1 or min(chosen["prompt_tokens"], chosen["prefill_tokens"]) < 1:
        raise ValueError("--repeats, --prompt-tokens and --prefill-tokens must be positive")
    tokenizer, metadata = _tokenizer_and_metadata(args.model)
    widest = max(chosen["batch_sizes"] + chosen["streams"])
    prompt = chosen["prompt_tokens"]
    longest = max(prompt, chosen["prefill_tokens"]) + max(chosen["new_tokens"],
                                                         chosen["long_tokens"])
    source = metadata.get("source")
    return Settings(
        model=args.model,
        prompt=prompt_ids(tokenizer, prompt),
        prefill_prompt=prompt_ids(tokenizer, chosen["prefill_tokens"], offset=3),
        batch_prompts=[prompt_ids(tokenizer, prompt, offset=5 * i) for i in range(widest)],
        new_tokens=chosen["new_tokens"], long_tokens=chosen["long_tokens"],
        batch_sizes=chosen["batch_sizes"], streams=chosen["streams"],
        repeats=chosen["repeats"], context=-(-(longest + 64) // 64) * 64,
        threads=args.threads, work_dir=work_dir, cache_dir=cache_dir,
        gguf_source=source if metadata.get("source_format") == "gguf" and source
        and os.path.isfile(source) else None,
        server_args=tuple(args.server_args.split()))


def _tokenizer_and_metadata(spec):
    """The model's tokenizer and metadata without loading its weights where
    the model is a directory (presets are imported on first use)."""
    import keras_llm  # pylint: disable=import-outside-toplevel
    from keras_llm import presets, saving  # pylint: disable=import-outside-toplevel
    from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel

    directory = presets.preset_dir(spec) if spec in presets.PRESETS else spec
    if not saving.is_model_dir(directory):
        lm = keras_llm.load(spec)
        return lm.tokenizer, lm.metadata
    with open(os.path.join(directory, saving.METADATA_FILE), encoding="utf-8") as handle:
        metadata = json.load(handle)
    return BytePairTokenizer.load_assets(directory), metadata


def run_engine(name, stage, settings_path, output, timeout):
    """One stage of one engine in a fresh process; its stderr goes to logs/."""
    result_path = os.path.join(output, "logs", f"{name}.{stage}.json")
    log_path = os.path.join(output, "logs", f"{name}.{stage}.log")
    command = [sys.executable, "-m", "benchmarks.engines", "--engine", name, "--stage", stage,
               "--settings", settings_path, "--result", result_path]
    if os.path.exists(result_path):
        os.remove(result_path)
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False,
                                  cwd=os.path.dirname(os.path.dirname(
                                      os.path.abspath(__file__)))).returncode
        except subprocess.TimeoutExpired:
            return {"engine": name, "status": "failed", "reason": f"{stage}: over {timeout} s"}
    if os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as handle:
            return json.load(handle)
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        tail = handle.read().strip().splitlines()[-1:] or [""]
    return {"engine": name, "status": "failed",
            "reason": f"{stage}: process ended with status {code}: {tail[0][:300]}"}


def lower_is_better(metric):
    return metric.startswith(LOWER_IS_BETTER)


def ratios(results):
    """For every keras-llm engine and competitor: how many times better
    keras-llm's median is, per figure both measured (> 1: keras-llm better)."""
    ok = [r for r in results if r["status"] == "ok"]
    out = {}
    for ours in (r for r in ok if r["ours"]):
        for theirs in (r for r in ok if not r["ours"]):
            pair = {}
            for metric, mine in ours["metrics"].items():
                other = theirs["metrics"].get(metric)
                if other is None or not mine["median"] or not other["median"]:
                    continue
                a, b = mine["median"], other["median"]
                pair[metric] = b / a if lower_is_better(metric) else a / b
            if pair:
                out[f"{ours['engine']} vs {theirs['engine']}"] = pair
    return out


def targets(results, settings):
    """The issue's done-when checks, where both sides were measured."""
    by_name = {r["engine"]: r for r in results if r["status"] == "ok"}

    def median(engine, metric):
        return by_name.get(engine, {}).get("metrics", {}).get(metric, {}).get("median")

    def is_server(r):
        return r["engine"].startswith("keras-llm-server")

    def best(predicate, metric):
        values = [(median(name, metric), name) for name, r in by_name.items()
                  if r["ours"] and predicate(r) and median(name, metric)]
        return max(values) if values else (None, None)

    def ratio(name, target, ours, theirs):
        (value, engine), other = ours, theirs
        if value is None or other is None:
            return {"target": name, "status": "not measured"}
        achieved = value / other
        return {"target": name, "engine": engine, "ratio": achieved, "needed": target,
                "status": "met" if achieved >= target else "missed"}

    b1 = "decode_tokens_per_s_b1"
    streams16 = "aggregate_tokens_per_s_16"
    long = f"generate_tokens_per_s_{settings.long_tokens}"
    ttft = f"time_to_first_token_s_p{len(settings.prefill_prompt)}"
    checks = [
        ratio("float32 decode at batch 1 vs llama.cpp F32", 1.0,
              best(lambda r: r["precision"] == "float32" and not is_server(r), b1),
              median("llama.cpp-f32", b1)),
        ratio("reduced precision decode at batch 1 vs llama.cpp Q8_0", 1.0,
              best(lambda r: r["precision"] != "float32" and not is_server(r), b1),
              median("llama.cpp-q8_0", b1)),
        ratio("server, 16 concurrent streams vs llama.cpp F32 with 16 sequences", 1.0,
              best(is_server, streams16), median("llama.cpp-f32", streams16)),
        ratio(f"end to end at {settings.long_tokens} new tokens vs the document's way", 30.0,
              best(lambda r: not is_server(r), long),
              median("document-way", long)),
    ]
    value, engine = min(((median(n, ttft), n) for n, r in by_name.items()
                         if is_server(r) and median(n, ttft)), default=(None, None))
    name = f"server time to first token, {len(settings.prefill_prompt)}-token prompt, 1 stream"
    checks.append({"target": name, "status": "not measured"} if value is None else
                  {"target": name, "engine": engine, "seconds": value,
                   "needed": 0.25, "status": "met" if value < 0.25 else "missed"})
    return checks


def token_agreement(results, reference="keras-llm-xla"):
    """Leading greedy tokens each engine shares with the reference engine."""
    ref = next((r for r in results if r["engine"] == reference and r["status"] == "ok"), None)
    if ref is None:
        return {}
    out = {}
    for r in results:
        if r["status"] != "ok":
            continue
        same = 0
        for a, b in zip(r["token_ids"], ref["token_ids"]):
            if a != b:
                break
            same += 1
        out[r["engine"]] = {"same_leading_tokens": same, "of": len(ref["token_ids"])}
    return out


def _format(metric, summary):
    if metric.startswith("time_to_first_token"):
        scale, digits = 1000, 1
    elif metric.startswith("peak_rss"):
        scale, digits = 1 / 2**20, 0
    else:
        scale, digits = 1, 1
    values = [summary[k] * scale for k in ("median", "min", "max")]
    if summary["n"] == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values[0]:.{digits}f} ({values[1]:.{digits}f}-{values[2]:.{digits}f})"


def _label(metric):
    labels = {"prefill_tokens_per_s": "prefill tokens/s",
              "time_to_first_token_s": "time to first token, ms",
              "decode_tokens_per_s_b1": "decode tokens/s, batch 1",
              "peak_rss_bytes": "peak memory (max RSS), MiB"}
    if metric in labels:
        return labels[metric]
    for prefix, text in (("time_to_first_token_s_p", "time to first token, {}-token prompt, ms"),
                         ("aggregate_tokens_per_s_", "aggregate tokens/s, {} at once"),
                         ("generate_tokens_per_s_", "end-to-end tokens/s, {} new tokens")):
        if metric.startswith(prefix):
            return text.format(metric[len(prefix):])
    return metric


def _metric_order(metric):
    order = ["prefill_tokens_per_s", "time_to_first_token_s_p", "time_to_first_token_s",
             "decode_tokens_per_s_b1", "aggregate_tokens_per_s_", "generate_tokens_per_s_",
             "peak_rss_bytes"]
    rank = next(i for i, p in enumerate(order + [""]) if metric.startswith(p))
    digits = "".join(c for c in metric if c.isdigit())
    return rank, int(digits) if digits and rank == 4 else 0


def table(report):
    """The report as markdown: figures per engine, ratios, targets."""
    m = report["machine"]
    s = report["settings"]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, TF "
             f"{m['tensorflow']}, keras-llm {m['keras_llm']}"
             + (f", llama-cpp-python {m['llama_cpp_python']}" if m.get("llama_cpp_python")
                else ""),
             f"model {s['model']}; {len(s['prompt'])}-token prompt, {s['new_tokens']} new "
             f"tokens, greedy; median of {s['repeats']} (min-max); aggregate = all tokens "
             "over wall time (prefill included)", ""]
    metrics = sorted({k for r in ok for k in r["metrics"]}, key=_metric_order)
    lines.append("| | " + " | ".join(r["engine"] for r in ok) + " |")
    lines.append("|---" * (len(ok) + 1) + "|")
    for metric in metrics:
        cells = [_format(metric, r["metrics"][metric]) if metric in r["metrics"] else "-"
                 for r in ok]
        lines.append(f"| {_label(metric)} | " + " | ".join(cells) + " |")
    agreement = report.get("token_agreement", {})
    if agreement:
        lines.append("| same greedy tokens as keras-llm-xla | " + " | ".join(
            f"{agreement[r['engine']]['same_leading_tokens']}/{agreement[r['engine']]['of']}"
            for r in ok) + " |")
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"\n{r['engine']}: {r['status']} ({r.get('reason', '')})")
    if report["ratios"]:
        pairs = list(report["ratios"])
        lines += ["", "keras-llm / competitor (median ratio, > 1: keras-llm better)", "",
                  "| | " + " | ".join(pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
        for metric in metrics:
            cells = [f"{report['ratios'][p][metric]:.2f}x" if metric in report["ratios"][p]
                     else "-" for p in pairs]
            if any(c != "-" for c in cells):
                lines.append(f"| {_label(metric)} | " + " | ".join(cells) + " |")
    lines += ["", "targets:"]
    for t in report["targets"]:
        if "ratio" in t:
            detail = f"{t['ratio']:.2f}x ({t['engine']}; needs {t['needed']:g}x)"
        elif "seconds" in t:
            detail = f"{t['seconds'] * 1000:.0f} ms (needs < {t['needed'] * 1000:.0f} ms)"
        else:
            detail = ""
        lines.append(f"- {t['target']}: {t['status']} {detail}".rstrip())
    return "\n".join(lines)


def write_tensorboard(directory, report):
    """Medians, mins and maxes of every figure and every ratio as scalars."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
        for r in report["results"]:
            for metric, summary in r.get("metrics", {}).items():
                for key in ("median", "min", "max"):
                    tf.summary.scalar(f"{r['engine']}/{metric}/{key}", summary[key], step=0)
        for pair, values in report["ratios"].items():
            for metric, value in values.items():
                tf.summary.scalar(f"ratio/{pair.replace(' ', '_')}/{metric}", value, step=0)
    writer.flush()
    writer.close()


def _library_versions():
    try:
        import llama_cpp  # pylint: disable=import-outside-toplevel
    except ImportError:
        return {}
    return {"llama_cpp_python": llama_cpp.__version__}


def run_suite(args):
    """Run the engines `args.engines` and write the report; returns it."""
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    known = engines()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown engine(s) {', '.join(unknown) or '(none)'}: "
                         f"choose from {', '.join(known)}")
    from keras_llm import presets  # pylint: disable=import-outside-toplevel

    output = os.path.abspath(args.output)
    os.makedirs(os.path.join(output, "logs"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="work-", dir=output)
    cache = os.path.join(os.path.dirname(presets.cache_root()), "bench")
    tensorboard = os.path.join(output, "tensorboard")
    try:
        settings = settings_from_args(args, work, cache)
        if args.profile:
            settings.profile_dir = tensorboard
        settings_path = os.path.join(work, "settings.json")
        settings.save(settings_path)
        results = []
        for name in names:
            start = time.perf_counter()
            result = describe(name, settings)
            if result["status"] == "ok" and result["prepare"]:
                result = run_engine(name, "prepare", settings_path, output, args.timeout)
            if result["status"] == "ok":
                prepare_s = result.get("prepare_s")
                result = run_engine(name, "measure", settings_path, output, args.timeout)
                result["prepare_s"] = prepare_s
            result["wall_s"] = time.perf_counter() - start
            print(f"[bench] {name}: {result['status']} in {result['wall_s']:.0f} s"
                  + (f" ({result['reason']})" if result.get("reason") else ""),
                  file=sys.stderr, flush=True)
            results.append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": {**machine(), **_library_versions()},
              "settings": {k: v for k, v in vars(settings).items()
                           if k not in ("work_dir", "batch_prompts")},
              "results": results}
    report["ratios"] = ratios(results)
    report["targets"] = targets(results, settings)
    report["token_agreement"] = token_agreement(results)
    report["table"] = table(report)
    write_tensorboard(tensorboard, report)
    staging = os.path.join(output, "results.json.partial")
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    os.replace(staging, os.path.join(output, "results.json"))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = run_suite(args)
    print(report["table"])
    print(f"\nwrote {os.path.join(os.path.abspath(args.output), 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
