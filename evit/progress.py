"""What a training run prints as it goes: time-stamped lines, and its per-step progress (a bar on a terminal)."""
from __future__ import annotations

import sys
import time


def _is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Progress:
    """A tqdm bar on a terminal, plain lines every ``every`` steps otherwise (SLURM logs). Rank 0 only."""

    def __init__(self, enabled: bool, total: int, desc: str, every: int, done: int = 0):
        self.enabled, self.total, self.desc, self.every = enabled, total, desc, every
        self.bar = None
        self.t0, self.n0 = time.perf_counter(), done
        if enabled and _is_tty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, desc=desc, leave=False)
            except ImportError:
                pass

    def update(self, done: int, batch: int, **stats) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if done % self.every == 0 or done == self.total:   # reading a device tensor waits for the device
                self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in stats.items() if v is not None}, refresh=False)
        elif done % self.every == 0 or done == self.total:
            rate = (done - self.n0) * batch / max(time.perf_counter() - self.t0, 1e-9)
            extra = " ".join(f"{k} {float(v):.4g}" for k, v in stats.items() if v is not None)
            log(f"{self.desc} step {done}/{self.total} {extra} {rate:.1f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
