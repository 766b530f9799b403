"""Run the suite with one pytest process per test file.

TensorFlow, tf_keras graphs, LiteRT interpreters and glibc's arenas keep much
of what a test module used even after it is freed, so one process running
every file grew past this project's 24 GB machine (the SmolLM2 modules hold
several GB each). A process per file bounds the suite's memory by its
largest file and costs a few seconds of imports per file.

    python -m tests.pytest_per_file [pytest options] [test files]

Prints each file's pytest output, then one line with the totals
(`N passed, N failed, N skipped`); exits non-zero when any file failed.
"""

import pathlib
import re
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parent
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
NO_TESTS = 5  # pytest's exit status when a file collected nothing


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    files = [a for a in argv if a.endswith(".py") or pathlib.Path(a).is_dir()]
    options = [a for a in argv if a not in files]
    paths = []
    for item in files or [str(TESTS)]:
        path = pathlib.Path(item)
        paths.extend(sorted(path.glob("test_*.py")) if path.is_dir() else [path])
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    broken = []
    timings = []
    start = time.perf_counter()
    for path in paths:
        print(f"== {path.relative_to(TESTS.parent) if path.is_absolute() else path}", flush=True)
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *options, str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False)
        print(proc.stdout, end="", flush=True)
        timings.append((time.perf_counter() - began, path.name))
        lines = [line for line in proc.stdout.splitlines() if COUNT.search(line)]
        for number, kind in COUNT.findall(lines[-1] if lines else ""):
            key = "error" if kind.startswith("error") else kind
            if key in totals:
                totals[key] += int(number)
        if proc.returncode not in (0, NO_TESTS):
            broken.append(f"{path.name} (exit {proc.returncode})")
    minutes = (time.perf_counter() - start) / 60
    print("slowest files: " + ", ".join(f"{name} {seconds:.0f} s"
                                         for seconds, name in sorted(timings, reverse=True)[:8]))
    if broken:
        print(f"failing files: {', '.join(broken)}")
    print(f"{len(paths)} files in {minutes:.1f} min")
    print(f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, "
          f"{totals['skipped']} skipped")
    return 1 if broken or totals["failed"] or totals["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
