"""Memory and speed of the default engine in this process, phase by phase.

    python -m benchmarks.footprint [--model smollm2] [--new-tokens 128]

Loads the model (its LiteRT file), decodes a 32-token prompt at batch 1
(median of 3 after a warm-up), then 16 prompts together (median of 2),
and prints one JSON object: time to a ready engine, RSS after each phase,
the peak (VmHWM) and the tokens/s. Run it once per version to compare
(each in its own process; README, "The LiteRT files").
"""

import argparse
import json
import statistics
import sys
import time


def _status(key):
    from benchmarks.common import process_status_kb  # pylint: disable=import-outside-toplevel
    return process_status_kb(key) // 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import keras_llm  # pylint: disable=import-outside-toplevel
    from benchmarks.common import prompt_ids  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.params import SamplingParams  # pylint: disable=import-outside-toplevel

    lm = keras_llm.load(args.model, progress=False, num_threads=args.threads)
    engine = lm.engine
    out = {"ready_s": round(time.perf_counter() - start, 2), "rss_ready_mb": _status("VmRSS")}
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    one = [prompt_ids(lm.host_tokenizer, 32)]
    engine.generate(one, params)
    rates = [(args.new_tokens - 1) / engine.generate(one, params)[0].decode_s for _ in range(3)]
    out["b1_tokens_per_s"] = round(statistics.median(rates), 2)
    out["rss_b1_mb"] = _status("VmRSS")
    batch = [prompt_ids(lm.host_tokenizer, 32, offset=5 * i) for i in range(16)]
    engine.generate(batch, params)
    rates = []
    for _ in range(2):
        began = time.perf_counter()
        engine.generate(batch, params)
        rates.append(16 * args.new_tokens / (time.perf_counter() - began))
    out["b16_tokens_per_s"] = round(statistics.median(rates), 2)
    out["rss_b16_mb"] = _status("VmRSS")
    out["peak_rss_mb"] = _status("VmHWM")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
