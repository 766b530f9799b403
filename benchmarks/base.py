"""What every benchmark engine shares: the settings, a run's result, and the
`Engine` base class that times the same prompts for every engine. The engines
themselves live in `benchmarks.engines` (keras-llm's own and the starting
document's way) and `benchmarks.llama_cpp` (the competitor); both import
this module and neither imports the other's classes.
"""

import dataclasses
import json
import os

from benchmarks.common import summarize


@dataclasses.dataclass
class Settings:
    """What every engine runs: the same model, prompts and token counts.

    Args:
        model: anything `keras_llm.load` accepts.
        prompt: the benchmark prompt's token ids.
        prefill_prompt: a longer prompt for prefill and its time to first token.
        batch_prompts: prompts for batches and concurrent streams (each the
            length of `prompt`).
        new_tokens: tokens generated per prompt.
        long_tokens: tokens of the end-to-end run at batch 1 (0: skip).
        batch_sizes: in-process batch sizes for `aggregate_tokens_per_s_{B}`.
        streams: concurrent gRPC streams for the server.
        repeats: timed runs per figure (after one untimed warm-up run).
        long_repeats: timed runs of the end-to-end `long_tokens` run.
        context: KV cache length per sequence where the engine takes one.
        threads: CPU threads where the engine takes a number (llama.cpp, LiteRT).
        work_dir: where prepared files go.
        cache_dir: where files worth keeping between runs go (GGUF rewrites).
        profile_dir: if set, engines that can write a profiler trace there.
        gguf_source: the GGUF file the model was imported from, if any.
        server_args: extra `keras-llm serve` flags.
    """

    model: str
    prompt: list
    prefill_prompt: list
    batch_prompts: list
    new_tokens: int = 128
    long_tokens: int = 256
    batch_sizes: tuple = (16,)
    streams: tuple = (1, 4, 16, 32)
    repeats: int = 3
    long_repeats: int = 1
    context: int = 512
    threads: int = 2
    work_dir: str = "."
    cache_dir: str = "."
    profile_dir: str = None
    gguf_source: str = None
    server_args: tuple = ()

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as handle:
            return cls(**json.load(handle))

    def save(self, path):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(self), handle)


@dataclasses.dataclass
class Run:
    """One timed generation: tokens per prompt and where the time went."""

    tokens: list
    time_to_first_token_s: float
    decode_s: float


class Unavailable(Exception):
    """The engine cannot run here (a package or module is missing)."""


class Engine:
    """Base class. Subclasses set `name`, `description`, `precision` and
    implement `setup` and `generate`; `prepare` is optional."""

    name = ""
    description = ""
    precision = "float32"
    ours = True  # a keras-llm engine (False: a competitor)
    max_batch = None  # largest batch `generate` takes (None: any)

    def __init__(self, settings):
        self.s = settings
        self.info = {}

    def directory(self):
        path = os.path.join(self.s.work_dir, self.name)
        os.makedirs(path, exist_ok=True)
        return path

    def check(self):
        """Raise `Unavailable` if this engine cannot run here."""

    def prepare(self):
        """Write the engine's files (runs in its own process)."""

    def setup(self):
        raise NotImplementedError

    def generate(self, prompts, new_tokens):
        """Greedy generation of `new_tokens` for each prompt; returns a `Run`."""
        raise NotImplementedError

    def profile(self):
        """Write a profiler trace of a few decode steps (if the engine can)."""

    def close(self):
        """Release what `setup` started."""

    # ----- the shared measurement ------------------------------------------

    def timed(self, prompts, new_tokens, repeats):
        self.generate(prompts, new_tokens)  # warm-up: compilation, caches
        return [self.generate(prompts, new_tokens) for _ in range(repeats)]

    def measure(self):
        s = self.s
        metrics = {}
        runs = self.timed([s.prefill_prompt], 1, s.repeats)
        ttfts = [r.time_to_first_token_s for r in runs]
        metrics[f"time_to_first_token_s_p{len(s.prefill_prompt)}"] = summarize(ttfts)
        metrics["prefill_tokens_per_s"] = summarize([len(s.prefill_prompt) / t for t in ttfts])

        runs = self.timed([s.prompt], s.new_tokens, s.repeats)
        metrics["time_to_first_token_s"] = summarize([r.time_to_first_token_s for r in runs])
        metrics["decode_tokens_per_s_b1"] = summarize(
            [(s.new_tokens - 1) / r.decode_s for r in runs])
        tokens = runs[-1].tokens[0]
        for batch in s.batch_sizes:
            if self.max_batch is not None and batch > self.max_batch:
                continue
            runs = self.timed(s.batch_prompts[:batch], s.new_tokens, s.repeats)
            metrics[f"aggregate_tokens_per_s_{batch}"] = summarize(
                [batch * s.new_tokens / (r.time_to_first_token_s + r.decode_s) for r in runs])
        if s.long_tokens:
            runs = self.timed([s.prompt], s.long_tokens, s.long_repeats)
            metrics[f"generate_tokens_per_s_{s.long_tokens}"] = summarize(
                [s.long_tokens / (r.time_to_first_token_s + r.decode_s) for r in runs])
        return metrics, tokens
