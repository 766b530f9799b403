"""A minimal progress bar for long steps, on stderr."""

import sys
import time


class Progress:
    """Counts work done and redraws one line on stderr at most 10 times/s.

    Args:
        total: number of units of work.
        label: what is being done.
        enabled: draw nothing when False (or when stderr is not a terminal
            and `always` is False, it prints only the final line).
    """

    def __init__(self, total, label, enabled=True, stream=None):
        self.total = max(int(total), 1)
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, amount=1):
        self.done += amount
        now = time.perf_counter()
        if self.enabled and self._tty and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(end="\r")

    def _draw(self, end):
        fraction = min(self.done / self.total, 1.0)
        bar = "#" * int(fraction * 30)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"{self.label}: [{bar:<30}] {fraction:6.1%} {elapsed:5.1f}s{end}")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self._draw(end="\n")
