"""What a new user meets first, measured side by side: README's main job in a
fresh process against llama.cpp in a fresh process, `keras-llm serve` from
start to SERVING on an export, and concurrent TF Serving `Predict` calls and
`Generate` streams through the server (with the server's memory: idle once
SERVING, its peak, and once the load is over).

    python -m benchmarks.first_minute cli --gguf smollm2-f32.gguf [--rounds 3]
    python -m benchmarks.first_minute serve --model_base_path DIR --model_name NAME \\
        [--streams 16] [--new-tokens 128]
    python -m benchmarks.first_minute decode [--litert FILE ...] [--against f32|q8_0|shipped]
        [--rounds 3]

Each figure is a median over rounds; the CLI rounds alternate keras-llm and
llama.cpp so that machine noise hits both alike. Prints one JSON object.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

QUESTION = "What is the capital of France?"

LLAMA_CHAT = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, n_ctx=1024, verbose=False)
out = llm.create_chat_completion(messages=[{"role": "user", "content": sys.argv[2]}],
                                 max_tokens=128, temperature=0.0)
print(out["choices"][0]["message"]["content"])
"""


def _wall(command):
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed: {proc.stderr[-1500:]}")
    return wall, proc.stdout.strip(), proc.stderr.strip()


def cli(args):
    ours = ["keras-llm", "generate", "--model", args.model, "--chat", "--prompt", QUESTION]
    theirs = [sys.executable, "-c", LLAMA_CHAT, args.gguf, QUESTION]
    _wall(ours)  # caches warm (and the LiteRT file built) before timing
    rows = {"keras-llm": [], "llama.cpp": []}
    answers = {}
    for _ in range(args.rounds):
        for name, command in (("keras-llm", ours), ("llama.cpp", theirs)):
            wall, out, err = _wall(command)
            rows[name].append(wall)
            answers[name] = out
            if name == "keras-llm" and err:
                answers["keras-llm stderr"] = err
    medians = {k: statistics.median(v) for k, v in rows.items()}
    return {"wall_s": rows, "median_s": medians,
            "ratio_keras_llm_to_llama_cpp": medians["keras-llm"] / medians["llama.cpp"],
            "answers": answers}


def serve(args):
    from benchmarks import bench_serving  # pylint: disable=import-outside-toplevel
    from benchmarks.common import prompt_ids  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.tokenizer import HostTokenizer  # pylint: disable=import-outside-toplevel
    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel

    versions = sorted(int(v) for v in os.listdir(os.path.join(args.model_base_path,
                                                              args.model_name)) if v.isdigit())
    tokenizer = HostTokenizer.load(os.path.join(args.model_base_path, args.model_name,
                                                str(versions[-1]), "assets"))
    port = bench_serving.free_port()
    start = time.perf_counter()
    proc = bench_serving.start_server(args.model_base_path, args.model_name, port,
                                      args.streams, 1024)
    serving_s = time.perf_counter() - start
    target = f"127.0.0.1:{port}"
    prompts = [prompt_ids(tokenizer, 32, offset=5 * i) for i in range(args.streams)]
    texts = [tokenizer.decode(p) for p in prompts]
    from benchmarks.common import process_status_kb  # pylint: disable=import-outside-toplevel
    result = {"time_to_serving_s": serving_s, "streams": args.streams,
              "new_tokens": args.new_tokens,
              "idle_rss_mb": process_status_kb("VmRSS", proc.pid) // 1024}
    try:
        def predict(text):
            with Client(target, timeout=900) as client:
                out = client.predict(args.model_name, [text], signature_name="generate",
                                     max_new_tokens=np.array([args.new_tokens], np.int32),
                                     temperature=np.zeros([1], np.float32),
                                     top_p=np.ones([1], np.float32),
                                     top_k=np.zeros([1], np.int32), seed=np.zeros([1], np.int32))
                return int(out["num_tokens"][0])

        def generate(ids):
            with Client(target, timeout=900) as client:
                return client.generate(ids, max_new_tokens=args.new_tokens,
                                       ignore_eos=True).generated_tokens

        for name, call, items in (("predict", predict, texts), ("generate", generate, prompts)):
            call(items[0])  # warm
            rates = []
            for _ in range(args.rounds):
                begin = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
                    tokens = sum(pool.map(call, items))
                rates.append(tokens / (time.perf_counter() - begin))
            result[f"{name}_aggregate_tokens_per_s"] = {
                "median": statistics.median(rates), "runs": rates}
        # the server's own peak, every stream's cache held (VmHWM)
        result["peak_rss_mb"] = process_status_kb("VmHWM", proc.pid) // 1024
        time.sleep(1)  # once idle, the engine hands its cache memory back
        result["rss_after_load_mb"] = process_status_kb("VmRSS", proc.pid) // 1024
        with open(f"/proc/{proc.pid}/maps", encoding="utf-8") as maps:
            result["tensorflow_loaded"] = "_pywrap_tensorflow_internal" in maps.read()
    finally:
        bench_serving.stop_server(proc)
    return result


def _settings(model):
    import tempfile  # pylint: disable=import-outside-toplevel

    from benchmarks.base import Settings  # pylint: disable=import-outside-toplevel
    from benchmarks.common import prompt_ids  # pylint: disable=import-outside-toplevel
    from keras_llm import presets  # pylint: disable=import-outside-toplevel
    from keras_llm.runtime.tokenizer import HostTokenizer  # pylint: disable=import-outside-toplevel

    tokenizer = HostTokenizer.load(presets.preset_dir(model))
    home = os.environ.get("KERAS_LLM_HOME") or os.path.expanduser("~/.cache/keras_llm")
    return Settings(model=model, prompt=prompt_ids(tokenizer, 32),
                    prefill_prompt=prompt_ids(tokenizer, 128, offset=3),
                    batch_prompts=[prompt_ids(tokenizer, 32, offset=5 * i) for i in range(16)],
                    new_tokens=128, long_tokens=0, batch_sizes=(16,), streams=(1,), repeats=3,
                    context=256, threads=2, work_dir=tempfile.mkdtemp(),
                    cache_dir=os.path.join(home, "bench"),
                    gguf_source=presets.preset_checkpoint(model))


def decode_one(args):
    """One engine in this process: decode tokens/s at batch 1 and the
    aggregate over 16 sequences (each a median of 3 after a warm-up), and
    the process's peak memory."""
    settings = _settings(args.model)
    if args.engine.startswith("llama.cpp"):
        from benchmarks import llama_cpp  # pylint: disable=import-outside-toplevel
        engine = {"llama.cpp-f32": llama_cpp.LlamaCppF32Engine,
                  "llama.cpp-q8_0": llama_cpp.LlamaCppQ80Engine,
                  "llama.cpp-shipped": llama_cpp.LlamaCppShippedEngine}[args.engine](settings)
        engine.prepare()
        engine.setup()
        generate = engine.generate
    else:
        from benchmarks.engines import run_engine, runtime_engine  # pylint: disable=import-outside-toplevel
        from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel
        if args.litert:
            backend = LiteRTBackend(args.litert, num_threads=2)
        else:
            import keras_llm  # pylint: disable=import-outside-toplevel
            backend = keras_llm.load(args.model, progress=False, num_threads=2).engine.backend
        engine = runtime_engine(backend)
        generate = lambda prompts, n: run_engine(engine, prompts, n)  # noqa: E731
    out = {}
    for batch, prompts in ((1, [settings.prompt]), (16, settings.batch_prompts)):
        generate(prompts, settings.new_tokens)
        runs = [generate(prompts, settings.new_tokens) for _ in range(3)]
        if batch == 1:
            out["decode_tokens_per_s_b1"] = statistics.median(
                (settings.new_tokens - 1) / r.decode_s for r in runs)
        else:
            out["aggregate_tokens_per_s_16"] = statistics.median(
                batch * settings.new_tokens / (r.time_to_first_token_s + r.decode_s) for r in runs)
        out[f"tokens_b{batch}"] = runs[-1].tokens[0][:24]
    from benchmarks.common import process_status_kb  # pylint: disable=import-outside-toplevel
    out["peak_rss_mb"] = process_status_kb("VmHWM") // 1024  # 16 sequences' caches held
    return out


def decode(args):
    """`decode-one` for each engine in its own process, alternating rounds."""
    against = args.against or ("q8_0" if args.litert else "f32")
    ours = ["--litert", *args.litert] if args.litert else []
    engines = {"keras-llm" + ("-litert-files" if args.litert else "-f32"): ours,
               f"llama.cpp-{against}": []}
    results = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, extra in engines.items():
            proc = subprocess.run([sys.executable, "-m", "benchmarks.first_minute", "decode-one",
                                   "--engine", name, "--model", args.model, *extra],
                                  capture_output=True, text=True, timeout=1800, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            results[name].append(json.loads(proc.stdout))
    summary = {name: {key: statistics.median(r[key] for r in runs)
                      for key in ("decode_tokens_per_s_b1", "aggregate_tokens_per_s_16",
                                  "peak_rss_mb")}
               for name, runs in results.items()}
    ours, theirs = list(summary)
    summary["ratios"] = {key: summary[ours][key] / summary[theirs][key] for key in summary[ours]}
    summary["same_greedy_b1"] = results[ours][0]["tokens_b1"] == results[theirs][0]["tokens_b1"]
    summary["runs"] = results
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("cli")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--gguf", required=True, help="llama.cpp's GGUF of the same weights (F32)")
    c.add_argument("--rounds", type=int, default=3)
    s = commands.add_parser("serve")
    s.add_argument("--model_base_path", required=True)
    s.add_argument("--model_name", required=True)
    s.add_argument("--streams", type=int, default=16)
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--rounds", type=int, default=3)
    d = commands.add_parser("decode")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--litert", nargs="+", default=None,
                   help="LiteRT files to run (e.g. int8 or int4); default: the model's own "
                        "files (float32)")
    d.add_argument("--against", choices=("f32", "q8_0", "shipped"), default=None,
                   help="llama.cpp's file: F32 or Q8_0 rewrites of the model's GGUF, or the "
                        "shipped GGUF itself (SmolLM2's is Q4_1); default q8_0 with --litert, "
                        "else f32")
    d.add_argument("--rounds", type=int, default=3)
    one = commands.add_parser("decode-one")
    one.add_argument("--engine", required=True)
    one.add_argument("--model", default="smollm2")
    one.add_argument("--litert", nargs="+", default=None)
    args = parser.parse_args(argv)
    run = {"cli": cli, "serve": serve, "decode": decode, "decode-one": decode_one}[args.command]
    result = run(args)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
