"""Progress on a terminal (rich), silence elsewhere, and human sizes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Progress = Callable[[str, int, int], None]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


@contextmanager
def terminal_progress(labels: dict[str, str]) -> Iterator[Progress | None]:
    """A progress callback drawing one bar per phase on stderr, if it is a tty.

    labels maps a phase name to its description; a phase whose total is 0
    shows a count only.
    """
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    bars: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[figure]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        # No refresh thread: the tree tools fork workers, and fork() in a
        # threaded process is what forked.can_fork() refuses.
        auto_refresh=False,
    ) as p:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = p.add_task(labels.get(phase, phase), total=total or None, figure="")
            if phase == "hash":
                fig = f"{human(done)} / {human(total)}"
            else:
                fig = f"{done:,} / {total:,}" if total else f"{done:,}"
            p.update(bars[phase], completed=done, total=total or None, figure=fig, refresh=True)

        yield update
