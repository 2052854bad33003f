"""A console progress bar with rate and ETA for long evaluations."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_seconds(seconds: float) -> str:
  seconds = int(round(max(seconds, 0)))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class Progress:
  """``done/total``, rate and ETA, redrawn in place on a terminal and printed every ``interval`` s otherwise.

  ``initial`` items (finished by an earlier run) count towards done but not towards the rate.
  """

  def __init__(self, total: int, description: str = "", initial: int = 0, stream: Optional[TextIO] = None,
               interval: float = 10.0, width: int = 30):
    self.total, self.done, self.initial = int(total), int(initial), int(initial)
    self.description = description
    self.stream = stream or sys.stderr
    self.interval = interval
    self.width = width
    self.start = time.perf_counter()
    self._last_print = -float("inf")
    self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

  def line(self) -> str:
    elapsed = time.perf_counter() - self.start
    fresh = self.done - self.initial
    fraction = self.done / self.total if self.total else 1.0
    filled = int(round(self.width * fraction))
    rate = fresh / elapsed if elapsed > 0 and fresh > 0 else 0.0
    eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
    return (f"{self.description} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"({100 * fraction:.1f}%) {rate:.2f}/s elapsed {format_seconds(elapsed)} ETA {eta}")

  def update(self, amount: int = 1) -> None:
    self.done += amount
    now = time.perf_counter()
    if self._tty or now - self._last_print >= self.interval or self.done >= self.total:
      self._last_print = now
      end = "\r" if self._tty and self.done < self.total else "\n"
      print(self.line(), end=end, file=self.stream, flush=True)

  def close(self) -> None:
    if self._tty and self.done < self.total:
      print(file=self.stream, flush=True)
