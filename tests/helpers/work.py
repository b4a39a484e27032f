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
