"""A one-line progress display on stderr: done/total, tokens/s, elapsed and ETA (no tqdm needed).

On a terminal the line is redrawn in place at most 10 times a second; in a log file (not a TTY) a plain line
is written at most every `log_every` seconds, so a long run leaves a readable, bounded trail.
"""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    """H:MM:SS or M:SS."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts finished items (prompts) and generated tokens; `advance` redraws when enough time has passed."""

    def __init__(self, total: int, unit: str = "prompts", stream=None, enabled: bool = True, log_every: float = 10.0):
        self.total, self.unit, self.enabled = total, unit, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.interval = 0.1 if self.tty else log_every
        self.done = self.tokens = 0
        self.status = ""  # what the work is doing now ("28/32 slots"), shown after the rate
        self.start = self.last_draw = time.perf_counter()

    def advance(self, items: int = 0, tokens: int = 0, status: str | None = None) -> None:
        """Count items finished and tokens generated since the last call; redraw if due."""
        self.done += items
        self.tokens += tokens
        if status is not None:
            self.status = status
        now = time.perf_counter()
        if self.enabled and now - self.last_draw >= self.interval:
            self.draw(now)

    def line(self, now: float) -> str:
        """The status line: '12/100 prompts [####----------------]  12% | 1523 tokens/s | 0:07 elapsed, ETA 0:51'."""
        elapsed = now - self.start
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        eta = _clock(elapsed * (self.total - self.done) / self.done) if self.done else "?"
        status = f" | {self.status}" if self.status else ""
        return (f"{self.done}/{self.total} {self.unit} [{bar}] {100 * frac:3.0f}% | "
                f"{self.tokens / max(elapsed, 1e-9):.0f} tokens/s{status} | {_clock(elapsed)} elapsed, ETA {eta}")

    def print(self, text: str) -> None:
        """Write a line of text above the status line (a log line during the run), then redraw the status."""
        if self.tty and self.enabled:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        if self.tty and self.enabled:
            self.draw(time.perf_counter())
        self.stream.flush()

    def draw(self, now: float) -> None:
        """Write the status line: in place on a terminal, as a new line otherwise."""
        self.last_draw = now
        self.stream.write(f"\r\033[K{self.line(now)}" if self.tty else self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self.draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
