"""Progress of long work deep inside a model (a coreset selection during `fit_normal`), shown on whatever bar the
caller set up, without a callback threaded through every layer between them.

    with progress_to(Bar):                  # the caller (seg.train): bars are made by this factory
        model.fit_normal(...)
    ...
    with task("coreset", n) as bar:         # deep inside (seg.models.features.greedy_coreset)
        for i in range(n):
            ...; bar(1)

With no factory set (tests, library use), `task` gives a bar that does nothing."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

_factory: ContextVar[Callable | None] = ContextVar("progress_factory", default=None)


def _silent(k: int = 1, **fields) -> None:
    pass


@contextmanager
def progress_to(factory: Callable | None) -> Iterator[None]:
    """Within the block, `task` makes its bars with `factory(description, total)` (a context manager whose value
    is called as `bar(k, **fields)`, as cli.Bar); None: silent."""
    token = _factory.set(factory)
    try:
        yield
    finally:
        _factory.reset(token)


@contextmanager
def task(description: str, total: int) -> Iterator[Callable]:
    """A bar of `total` steps from the factory set by `progress_to`, or a silent one."""
    factory = _factory.get()
    if factory is None or total <= 0:
        yield _silent
        return
    with factory(description, total) as bar:
        yield bar
