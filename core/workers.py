"""Worker processes that cannot deadlock, and a watchdog for the ones that stall or die.

Forking a parent whose OpenCV, OpenMP or torch thread pool is live can leave a child waiting forever on a lock
that a thread of the parent held at the fork (seen: `synth generate --workers 2` hanging at 0 % CPU in
`cv2.setNumThreads`). Workers here are started from a fresh interpreter (`forkserver` where the platform has it,
else `spawn`), get what they need through an initializer, and set their own thread limits there.

`ordered_map` yields results in submission order, so what the caller writes does not depend on the number of
workers. A worker that dies (killed, out of memory) or returns nothing for `stall_seconds` ends the run with a
`WorkerError` naming its items; results already yielded stay with the caller (a rerun resumes). A death fails
every chunk in flight, so those are redone one by one, each in a worker of its own: the good ones are delivered
and the error names the chunk that kills its worker, however the chunks were scheduled.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Sequence

from .io import InputError

STALL_SECONDS = float(os.environ.get("DEFECT_SYNTH_STALL_SECONDS", 300))


class WorkerError(InputError):
    """A worker process died or made no progress; the message names the work it held."""


def start_method() -> str:
    """`forkserver` on platforms that have it (Linux, macOS), else `spawn`: never a bare fork of this process."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def context():
    return mp.get_context(start_method())


def limit_threads(n: int = 1) -> None:
    """Thread limits for a worker process, set in the worker itself (safe: nothing else runs there yet)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import cv2

    cv2.setNumThreads(n)
    if "torch" in sys.modules:  # only where the work uses it (DataLoader workers); synthesis workers never load it
        sys.modules["torch"].set_num_threads(n)


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    for k in range(0, len(items), size):
        yield list(items[k:k + size])


def ordered_map(fn: Callable[[list], list], items: Sequence, workers: int, initializer=None, initargs=(),
                chunk: int = 16, describe: Callable[[list], str] = str,
                stall_seconds: float | None = None) -> Iterable:
    """Yield `fn(chunk)`'s results for consecutive chunks of `items`, in order, from `workers` processes.

    `fn` takes a list of items and returns a list of results (one per item). At most 2 x workers chunks are in
    flight. `describe(chunk)` names a chunk in errors.
    """
    stall = STALL_SECONDS if stall_seconds is None else stall_seconds
    ex = ProcessPoolExecutor(workers, mp_context=context(), initializer=initializer, initargs=initargs)
    pending: deque = deque()
    chunks = _chunks(items, chunk)
    try:
        for c in chunks:
            pending.append((c, _submit(ex, fn, c)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            c, fut = pending.popleft()
            try:
                results = fut.result(timeout=stall)
            except FutureTimeout:
                raise WorkerError(f"a worker made no progress for {stall:.0f} s on {describe(c)}; finished work is "
                                  "kept, rerun the same command to resume") from None
            except BrokenProcessPool:
                # the death failed every chunk in flight, whichever worker held it: keep what had finished, redo
                # the rest one by one, each in a worker of its own, so the good ones are delivered and the error
                # names the chunk that kills
                _stop(ex)
                inflight = [(c, fut)] + list(pending)
                for cc, ff in inflight:
                    if ff.done() and not ff.cancelled() and ff.exception() is None:
                        yield from ff.result()
                    else:
                        yield from _alone(fn, cc, initializer, initargs, stall, describe)
                raise WorkerError(f"a worker process died (killed, out of memory, or failed to start) while on "
                                  f"{', '.join(describe(x) for x, _ in inflight)}; each finished when redone alone "
                                  "(killed from outside?); finished work is kept, rerun the same command to resume"
                                  ) from None
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append((nxt, _submit(ex, fn, nxt)))
            yield from results
    finally:
        _stop(ex)


def _submit(ex: ProcessPoolExecutor, fn, c: list) -> Future:
    """`ex.submit(fn, c)`; once a worker has died the pool refuses new work, and the chunk gets a failed future
    instead, which the caller redoes with the other chunks in flight."""
    try:
        return ex.submit(fn, c)
    except BrokenProcessPool as e:
        fut: Future = Future()
        fut.set_exception(e)
        return fut


def _alone(fn, c: list, initializer, initargs, stall: float, describe) -> list:
    """`fn(c)` in a worker process of its own; a death or a stall there is a `WorkerError` naming `c`."""
    ex = ProcessPoolExecutor(1, mp_context=context(), initializer=initializer, initargs=initargs)
    try:
        return ex.submit(fn, c).result(timeout=stall)
    except FutureTimeout:
        raise WorkerError(f"a worker made no progress for {stall:.0f} s on {describe(c)}; finished work is kept, "
                          "rerun the same command to resume") from None
    except BrokenProcessPool:
        raise WorkerError(f"a worker process died (killed, out of memory, or failed to start) on {describe(c)}; "
                          "finished work is kept, rerun the same command to resume") from None
    finally:
        _stop(ex)


def _stop(ex: ProcessPoolExecutor) -> None:
    """Shut the pool down without waiting on a stalled worker."""
    procs = list((getattr(ex, "_processes", None) or {}).values())  # None once shut down
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)
