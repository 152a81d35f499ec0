"""A dependency-free text progress bar on stderr (quiet when not a terminal unless forced)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "search") as bar: bar.update(1, loss=0.3)``"""

    def __init__(self, total: int, label: str = "", enabled: bool | None = None, width: int = 28):
        self.total, self.label, self.width = max(1, int(total)), label, width
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.n, self.t0, self._last = 0, time.perf_counter(), 0.0

    def update(self, k: int = 1, **info) -> None:
        self.n = min(self.total, self.n + k)
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and self.n < self.total):
            return
        self._last = now
        frac = self.n / self.total
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        el = now - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        sys.stderr.write(f"\r{self.label} [{bar}] {self.n}/{self.total} {el:.1f}s eta {eta:.1f}s {extra}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
