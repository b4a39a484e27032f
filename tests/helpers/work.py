"""Worker functions for tests/test_robust.py (importable by worker processes)."""

from __future__ import annotations

import os
import signal
import time


def square(chunk: list[int]) -> list[int]:
    return [i * i for i in chunk]


def dies_on_five(chunk: list[int]) -> list[int]:
    if 5 in chunk:
        os.kill(os.getpid(), signal.SIGKILL)
    return square(chunk)


def stalls_on_five(chunk: list[int]) -> list[int]:
    if 5 in chunk:
        time.sleep(120)
    return square(chunk)


def slow_first_dies_on_five(chunk: list[int]) -> list[int]:
    """The first chunk is slow, the worker holding item 5 dies at once: the death fails the slow chunk too."""
    if 0 in chunk:
        time.sleep(1.5)
    return dies_on_five(chunk)


def reports_then_squares(n: int) -> tuple[int, int]:
    """A `run_each` call: n progress reports, then n*n and the threads it was given."""
    import torch

    from core.workers import report

    for _ in range(n):
        report(1)
    return n * n, torch.get_num_threads()


def fails_or_sleeps(what) -> None:
    """A `run_each` call: a string is a bad input (an InputError with that text), a number seconds of sleep."""
    from core.io import InputError

    if isinstance(what, str):
        raise InputError(what)
    time.sleep(what)


def dies_or_sleeps(seconds) -> None:
    """A `run_each` call: None kills its own process, a number sleeps that long."""
    if seconds is None:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)
