"""The engines the benchmark suite measures, each run in its own process.

An engine is a small class: `prepare` writes what it needs (an .h5 file, an
export, a .tflite or GGUF file) in one process, then `setup` loads it and
`generate` runs greedy generation in a fresh process, so that the peak memory
of that process is the engine's own. `measure` times the same prompts and
token counts for every engine:

- `prefill_tokens_per_s` and `time_to_first_token_s_p{N}`: an N-token prompt,
  one new token;
- `time_to_first_token_s` and `decode_tokens_per_s_b1`: the benchmark prompt,
  the benchmark's new tokens, batch 1 (decode excludes the first token);
- `aggregate_tokens_per_s_{B}`: B prompts at once, all tokens over the wall
  time from the start to the last token (prefill included);
- `generate_tokens_per_s_{N}`: N new tokens at batch 1, end to end;
- `peak_rss_bytes`: the most resident memory the engine's process (for the
  server: the server's process) ever held.

Adding an engine is a class with `setup` and `generate` and a line in
`ENGINES`.

    python -m benchmarks.engines --engine NAME --stage prepare|measure \
        --settings settings.json --result result.json
"""

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

from benchmarks.base import Engine, Run, Settings, Unavailable  # noqa: F401  (re-exported)
from benchmarks.common import process_status_kb, summarize


def run_engine(engine, prompts, new_tokens):
    """Greedy ids through keras-llm's runtime engine (never stopping early),
    timed as every engine here is: first token of the batch, then decode."""
    from keras_llm.runtime.params import SamplingParams  # pylint: disable=import-outside-toplevel

    results = engine.generate([list(map(int, p)) for p in prompts],
                              SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                              text=False)
    first = max(r.time_to_first_token_s for r in results)
    return Run([r.token_ids for r in results], first, max(r.total_s for r in results) - first)


def runtime_engine(backend, slots=16):
    from keras_llm.runtime.engine import Engine as RuntimeEngine, EngineConfig  # pylint: disable=import-outside-toplevel

    return RuntimeEngine(backend, None, EngineConfig(max_slots=slots), stop_ids=())


class XlaEngine(Engine):
    name = "keras-llm-xla"
    description = "keras-llm's engine on its XLA backend (per-step compiled decode), float32"

    def setup(self):
        import keras_llm  # pylint: disable=import-outside-toplevel

        start = time.perf_counter()
        lm = keras_llm.load(self.s.model, progress=False, backend="xla", max_slots=16)
        self.engine = lm.engine
        self.engine.warmup()
        self.info["compile_s"] = time.perf_counter() - start

    def generate(self, prompts, new_tokens):
        return run_engine(self.engine, prompts, new_tokens)

    def profile(self):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        steps = min(16, self.s.new_tokens)
        self.generate([self.s.prompt], steps)  # compiled and warm before the trace
        tf.profiler.experimental.start(self.s.profile_dir)
        try:
            for _ in range(2):
                self.generate([self.s.prompt], steps)
        finally:
            tf.profiler.experimental.stop()
        self.info["profile"] = f"2 x {steps} greedy tokens at batch 1 in {self.s.profile_dir}"


class LiteRTEngine(Engine):
    """keras-llm's LiteRT backend on files converted for the benchmark."""

    quantization = None

    def check(self):
        try:
            from keras_llm import litert  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except ImportError as error:
            raise Unavailable(f"keras_llm.litert is not importable: {error}") from None

    def path(self):
        return os.path.join(self.directory(), "model.tflite")

    def files(self):
        with open(os.path.join(self.directory(), "files.json"), encoding="utf-8") as handle:
            return json.load(handle)

    def prepare(self):
        import keras_llm  # pylint: disable=import-outside-toplevel
        from keras_llm import litert  # pylint: disable=import-outside-toplevel

        lm = keras_llm.load(self.s.model, progress=False)
        files = litert.convert(lm.model, self.path(), quantization=self.quantization,
                               max_length=self.s.context,
                               calibration_ids=litert.calibration_ids(lm.tokenizer),
                               batch_sizes=tuple(sorted({1, *self.s.batch_sizes})),
                               lengths=litert.default_lengths(self.s.context), split=True)
        with open(os.path.join(self.directory(), "files.json"), "w", encoding="utf-8") as handle:
            json.dump(files, handle)

    def setup(self):
        from keras_llm.runtime.litert import LiteRTBackend  # pylint: disable=import-outside-toplevel

        self.engine = runtime_engine(LiteRTBackend(self.files(), num_threads=self.s.threads))
        self.info["file_bytes"] = sum(os.path.getsize(p) for p in self.files())

    def generate(self, prompts, new_tokens):
        return run_engine(self.engine, prompts, new_tokens)


class LiteRTFloat32Engine(Engine):
    """What `keras_llm.load(model).generate` runs: the engine over the
    model's own LiteRT files (float32, built once beside the model)."""

    name = "keras-llm-litert-f32"
    description = "keras-llm's default path: the engine on the model's LiteRT files (XNNPACK), float32"

    def prepare(self):
        import keras_llm  # pylint: disable=import-outside-toplevel

        keras_llm.load(self.s.model, progress=False).engine  # builds the files once

    def setup(self):
        import keras_llm  # pylint: disable=import-outside-toplevel

        lm = keras_llm.load(self.s.model, progress=False, num_threads=self.s.threads,
                            backend="litert")
        self.engine = runtime_engine(lm.engine.backend)
        self.info["file_bytes"] = sum(os.path.getsize(p) for p in lm.engine.backend.runner.paths)

    def generate(self, prompts, new_tokens):
        return run_engine(self.engine, prompts, new_tokens)


class LiteRTInt8Engine(LiteRTEngine):
    name = "keras-llm-litert-int8"
    description = "keras-llm LiteRT (XNNPACK), dynamic-range int8 with SmoothQuant scales"
    precision = "int8"
    quantization = "int8"


class DocumentEngine(Engine):
    """The starting document's way: `load_model('model.h5')`, then `predict`
    on the whole sequence for every new token."""

    name = "document-way"
    description = "tf.keras.models.load_model(.h5) + predict on the whole sequence per token"
    ours = False
    max_batch = 1

    def path(self):
        return os.path.join(self.directory(), "model.h5")

    def prepare(self):
        import keras_llm  # pylint: disable=import-outside-toplevel

        keras_llm.load(self.s.model, progress=False).model.save(self.path())

    def setup(self):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        import keras_llm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

        self.model = tf.keras.models.load_model(self.path(), compile=False)

    def generate(self, prompts, new_tokens):
        ids = np.array(prompts, np.int32)
        start = time.perf_counter()
        first = None
        for _ in range(new_tokens):
            logits = self.model.predict(ids, verbose=0)  # (B, T, V)
            ids = np.concatenate([ids, np.argmax(logits[:, -1], -1)[:, None].astype(np.int32)], 1)
            if first is None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        return Run(ids[:, len(prompts[0]):].tolist(), first, total - first)


class ServerEngine(Engine):
    """`keras-llm serve` in its own process on an export, driven over gRPC."""

    name = "keras-llm-server"
    description = "keras-llm serve (gRPC streaming) on an export, concurrent streams"

    def base(self):
        return os.path.join(self.directory(), "export")

    def prepare(self):
        from keras_llm.export.saved_model import export_model  # pylint: disable=import-outside-toplevel

        export_model(self.s.model, self.base(), "bench",
                     max_new_tokens=max(self.s.new_tokens, 1), progress=False,
                     **self.export_options())

    def export_options(self):
        return {}

    def setup(self):
        from benchmarks import bench_serving  # pylint: disable=import-outside-toplevel

        self.port = bench_serving.free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.server = bench_serving.start_server(
            self.base(), "bench", self.port, max(self.s.streams), self.s.context,
            extra_args=list(self.s.server_args))

    def streams(self, prompts, new_tokens):
        from benchmarks import bench_serving  # pylint: disable=import-outside-toplevel

        return bench_serving.run_streams(self.target, prompts, new_tokens)

    def measure(self):
        s = self.s
        metrics = {}
        prompt128 = [s.prefill_prompt]
        self.streams(prompt128, 1)
        ttfts = [self.streams(prompt128, 1).first_token_s[0] for _ in range(s.repeats)]
        metrics[f"time_to_first_token_s_p{len(s.prefill_prompt)}"] = summarize(ttfts)
        metrics["prefill_tokens_per_s"] = summarize([len(s.prefill_prompt) / t for t in ttfts])
        self.streams([s.prompt], s.new_tokens)
        runs = [self.streams([s.prompt], s.new_tokens) for _ in range(s.repeats)]
        metrics["time_to_first_token_s"] = summarize([r.first_token_s[0] for r in runs])
        metrics["decode_tokens_per_s_b1"] = summarize(
            [(r.tokens[0] - 1) / (r.last_token_s[0] - r.first_token_s[0]) for r in runs])
        token_ids = runs[-1].token_ids[0]
        for level in s.streams:
            prompts = s.batch_prompts[:level]
            self.streams(prompts, min(8, s.new_tokens))  # warm this many rows
            runs = [self.streams(prompts, s.new_tokens) for _ in range(s.repeats)]
            metrics[f"aggregate_tokens_per_s_{level}"] = summarize(
                [sum(r.tokens) / r.seconds for r in runs])
        return metrics, token_ids

    def peak_rss_bytes(self):
        return _high_water_mark(self.server.pid)

    def close(self):
        from benchmarks import bench_serving  # pylint: disable=import-outside-toplevel

        if getattr(self, "server", None) is not None:
            bench_serving.stop_server(self.server)


def _high_water_mark(pid):
    """Peak resident memory of a live process (Linux /proc), in bytes."""
    return process_status_kb("VmHWM", pid) * 1024


class ServerLiteRTInt8Engine(ServerEngine):
    """The server on an export with `--litert int8`: decode steps by LiteRT."""

    name = "keras-llm-server-litert-int8"
    description = "keras-llm serve on a --litert int8 export (XNNPACK int8), concurrent streams"
    precision = "int8"

    def export_options(self):
        # A decode batch size for every stream count measured, and the
        # default shorter caches (export's litert_lengths=None).
        return {"litert": "int8", "litert_batch_sizes": tuple(sorted({1, *self.s.streams})),
                "litert_max_length": self.s.context}


def engines():
    """Every engine class by name, in the order the suite runs them."""
    from benchmarks import llama_cpp  # pylint: disable=import-outside-toplevel  (optional extra)

    classes = [XlaEngine, LiteRTFloat32Engine, LiteRTInt8Engine, ServerEngine,
               ServerLiteRTInt8Engine, DocumentEngine, llama_cpp.LlamaCppF32Engine, llama_cpp.LlamaCppQ80Engine]
    return {cls.name: cls for cls in classes}


def engine_class(name):
    classes = engines()
    if name not in classes:
        raise ValueError(f"unknown engine {name!r}: choose from {', '.join(classes)}")
    return classes[name]


def describe(name, settings):
    """What the suite records about an engine before running it; `status`
    is "skipped" (with a reason) when it cannot run here, and `prepare`
    says whether it has a prepare stage."""
    engine = engine_class(name)(settings)
    result = {"engine": name, "description": engine.description,
              "precision": engine.precision, "ours": engine.ours,
              "prepare": type(engine).prepare is not Engine.prepare}
    try:
        engine.check()
    except Unavailable as error:
        return {**result, "status": "skipped", "reason": str(error)}
    return {**result, "status": "ok"}


def run(name, stage, settings):
    """Run one stage of one engine in this process; returns a result dict."""
    result = describe(name, settings)
    if result["status"] != "ok":
        return result
    engine = engine_class(name)(settings)
    start = time.perf_counter()
    if stage == "prepare":
        engine.prepare()
        return {**result, "prepare_s": time.perf_counter() - start}
    try:
        engine.setup()
        result["setup_s"] = time.perf_counter() - start
        metrics, tokens = engine.measure()
        if settings.profile_dir:
            engine.profile()
        # VmHWM, not getrusage: Linux keeps ru_maxrss across execve, so a
        # child would report the suite's own peak.
        peak = getattr(engine, "peak_rss_bytes", None)
        peak = peak() if peak else _high_water_mark(os.getpid())
    finally:
        engine.close()
    metrics["peak_rss_bytes"] = summarize([peak])
    return {**result, "metrics": metrics, "token_ids": list(tokens), "info": engine.info}


def main(argv=None):
    parser = argparse.ArgumentParser(description="run one benchmark engine")
    parser.add_argument("--engine", required=True)
    parser.add_argument("--stage", choices=("prepare", "measure"), required=True)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    settings = Settings.load(args.settings)
    # Run as `-m`, this file is `__main__`; the engine classes (and the
    # `Unavailable` they raise) belong to the importable module.
    from benchmarks import engines as module  # pylint: disable=import-outside-toplevel,import-self

    try:
        result = module.run(args.engine, args.stage, settings)
    except Exception as error:  # pylint: disable=broad-except
        traceback.print_exc()
        result = {"engine": args.engine, "status": "failed",
                  "reason": f"{args.stage}: {type(error).__name__}: {error}".splitlines()[0]}
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
