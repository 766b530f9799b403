"""Shared pieces of the benchmark scripts: machine facts, prompts, stats."""

import os
import platform
import statistics
import subprocess
import time

# A fixed natural-language passage (public-domain prose written for this
# project) cut into prompts of the lengths a benchmark asks for.
PASSAGE = (
    "The harbour town woke slowly. Fishermen carried their nets down the stone "
    "steps while the bakers opened their shutters and the smell of bread drifted "
    "over the water. On the hill above the market, the old observatory caught the "
    "first light, and the children who lived nearby raced each other to the gate, "
    "hoping the astronomer would let them look through the great brass telescope. "
    "She rarely refused. Every morning she explained a little more about the sky: "
    "why the moon changes its face, how far away the nearest stars are, and why "
    "the planets wander while the constellations keep their shapes. The children "
    "wrote everything down in small notebooks, drew diagrams of orbits and eclipses, "
    "and argued about whether there might be other towns like theirs circling "
    "distant suns. In the afternoons the harbour grew loud with trade: merchants "
    "from the southern islands sold spices, copper pots and bright cloth, and "
    "sailors told stories of storms and sea serpents that grew larger with every "
    "telling. "
)


def machine():
    """What this machine is: CPU model, cores, versions."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import keras_llm  # pylint: disable=import-outside-toplevel

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "keras_llm": keras_llm.__version__,
    }


def process_status_kb(key, pid="self"):
    """A field of `/proc/<pid>/status` in kB (Linux): "VmHWM" (peak resident
    memory), "VmRSS" (resident now)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"no {key} for process {pid}")


def prompt_ids(tokenizer, length, offset=0):
    """`length` token ids of the passage, starting `offset` tokens in."""
    ids = tokenizer.encode(PASSAGE * 8)
    if offset + length > len(ids):
        raise ValueError(f"passage too short for {offset + length} tokens")
    return ids[offset:offset + length]


def summarize(values):
    """Median, min and max of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def write_report(path, report):
    """Write a benchmark's results as JSON (no-op without a path)."""
    if path:
        import json  # pylint: disable=import-outside-toplevel

        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
