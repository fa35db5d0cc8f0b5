"""The range of every numeric command-line option, checked in one place by argparse.

Each factory returns an argparse ``type`` function: the text becomes an int or float, or
argparse exits 2 naming the option and the allowed range (``argument --wait: must be 0 or
more seconds, got -1``). A number outside its range is refused, never silently used (a
negative wait, a negative lag threshold).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in low..high (high None: no upper bound)."""
    allowed = f"{low}-{high}" if high is not None else f"{low} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    parse.__name__ = f"whole number ({allowed})"
    return parse


def number(expected: str, allowed: str, above_zero: bool) -> Callable[[str], float]:
    """A finite number, 0 or more (above 0 when ``above_zero``); ``expected`` and
    ``allowed`` word the two refusals (not a number, out of range)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from exc
        if not math.isfinite(value) or value < 0 or (value == 0 and above_zero):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    parse.__name__ = allowed
    return parse


seconds = number("seconds", "0 or more seconds", above_zero=False)  # a duration
rate = number("a number per second", "above 0 per second", above_zero=True)  # events/s


SNAPSHOT_MAX_CHUNK = 100_000
# Rows per chunk: a chunk is one query (and, for a snapshot, one window between watermarks);
# 0 or less would never finish, a huge one holds one long query.
chunk_size = whole(1, SNAPSHOT_MAX_CHUNK)
count = whole(0)  # how many (customers, orders, changes, keys listed, lag events)
offset = whole(0)  # a partition number
object_id = whole(1)  # a database id (dead letter, snapshot): serial, from 1
