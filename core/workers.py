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

`run_each` runs a few long calls side by side (one model a seed), each in a process of its own with a share of the
threads, and relays their progress to the parent's progress bar.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_any
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


# --------------------------------------------------------------------------------------- long calls side by side
_REPORT = None  # in a `run_each` child: the queue to the parent


def _orphaned(parent: int) -> None:
    """In a `run_each` child: end this process once the parent that waits for it is gone (killed), instead of
    working on for nobody (what it finished stays on disk)."""
    while True:
        time.sleep(2)
        try:
            os.kill(parent, 0)
        except OSError:  # gone (or its number already another user's process)
            os._exit(1)


def _child(fn: Callable, args: tuple, q, threads: int, index: int, parent: int) -> None:
    """A `run_each` call in its own process: thread limits, then `fn(*args)`; its result or its error (with the
    traceback's text) goes to the parent through `q`."""
    global _REPORT
    _REPORT = q
    threading.Thread(target=_orphaned, args=(parent,), daemon=True).start()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # this share, not the parent's setting that the child inherits
    import torch  # noqa: F401 - loaded first, so that limit_threads sets its threads too

    limit_threads(threads)
    try:
        q.put(("done", index, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - every failure goes to the parent, which raises it
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(e))  # it must also be rebuilt on the other side
        except Exception:  # an exception that does not travel: its text, an InputError still one line
            e = (InputError if isinstance(e, InputError) else RuntimeError)(f"{type(e).__name__}: {e}")
        q.put(("error", index, e, text))


def report(k: int = 1) -> None:
    """In a `run_each` child: advance the parent's progress by k (a no-op elsewhere)."""
    if _REPORT is not None:
        _REPORT.put(("progress", k))


class ReportBar:
    """A progress-bar factory for code running in a `run_each` child: `bar(k, **fields)` reports k to the parent
    (the fields, a live loss, stay in the child)."""

    shows_side_tasks = False  # the parent's bar counts training steps: a coreset's progress does not go there

    def __init__(self, description: str, total: int):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __call__(self, k: int = 1, **fields) -> None:
        report(k)


class RemoteTraceback(Exception):
    """The traceback of an error raised in a child process (the `__cause__` of the error raised again here)."""

    def __str__(self) -> str:
        return self.args[0]


def run_each(fn: Callable, calls: Sequence[tuple], workers: int, threads: int,
             progress: Callable[[int], None] | None = None, describe: Callable[[tuple], str] = str,
             stall_seconds: float | None = None, done: Callable[[int, object], None] | None = None) -> list:
    """`fn(*call)` for every call, `workers` at a time, each in a fresh process (`forkserver` or `spawn`) limited
    to `threads` threads; results in call order. A child advances `progress` through `report` (or a `ReportBar`).
    A child's error is raised here as it was raised there (an `InputError` stays one line); a child that dies is a
    `WorkerError` naming its call, one that reports nothing for `stall_seconds` one naming the calls running. The
    first failure stops the other children (what they finished, e.g. checkpoints, stays on disk for a resume).
    `done(index, result)` is called as each call finishes, so what finished before a failure is not lost."""
    stall = STALL_SECONDS if stall_seconds is None else stall_seconds
    ctx = context()
    q = ctx.SimpleQueue()  # a put is in the pipe before the child exits: nothing is lost at the end
    pending, running, results = list(range(len(calls))), {}, {}
    try:
        last = time.monotonic()
        while pending or running:
            while pending and len(running) < max(1, workers):
                i = pending.pop(0)
                # not daemonic: a child may start workers of its own (train.workers)
                p = ctx.Process(target=_child, args=(fn, tuple(calls[i]), q, threads, i, os.getpid()))
                p.start()
                running[i] = p
            exited = [i for i, p in running.items() if p.exitcode is not None]  # before reading: their last words
            while not q.empty():  # are in the pipe by now
                msg = q.get()
                last = time.monotonic()
                if msg[0] == "progress":
                    if progress is not None:
                        progress(msg[1])
                elif msg[0] == "done":
                    results[msg[1]] = msg[2]
                    if done is not None:
                        done(msg[1], msg[2])
                else:
                    _, i, err, text = msg
                    raise err from RemoteTraceback(text)
            for i in exited:
                running.pop(i).join()
                if i not in results:
                    raise WorkerError(f"the process of {describe(calls[i])} died (killed, out of memory, or failed "
                                      "to start); finished work is kept, rerun with --resume to continue")
            if time.monotonic() - last > stall:
                raise WorkerError(f"no progress for {stall:.0f} s on {', '.join(describe(calls[i]) for i in running)}"
                                  "; finished work is kept, rerun with --resume to continue")
            if running:  # until a child ends or a quarter of a second passes
                wait_any([p.sentinel for p in running.values()], timeout=0.25)
        return [results[i] for i in range(len(calls))]
    finally:
        for p in running.values():
            p.kill()
        for p in running.values():
            p.join(timeout=5)
        q.close()
