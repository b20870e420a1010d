"""Work shared by forked worker processes (clone, unify's scan and hash).

The tree tools spend their time in syscalls, thousands per tree, which the
kernel runs in parallel; Python between them holds the GIL, so threads
measured no faster than one.  Forked processes need no pickling of the
work: each child has the parent's memory, does its share, and sends back a
marshalled result through a pipe.  The parent does the first share itself.

A worker dies with its parent: killing the tool stops all of it.  A failure
in any share fails the whole call the way it would have failed in
the parent: a CowfsError keeps its type and message, an OSError its errno
and filename; anything else is a RuntimeError naming it.  Every child is
reaped before the call returns or raises.
"""

from __future__ import annotations

import marshal
import os
import signal
import sys

from . import errors
from .sys import die_with_parent

TYPE_CHECKING = False  # typing itself costs 9 ms of start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    S = TypeVar("S")
    R = TypeVar("R")


# fds a worker closes first: locks only the parent may hold.
parent_only: set[int] = set()


def can_fork() -> bool:
    """False in a threaded process: fork() copies locks other threads hold."""
    threading = sys.modules.get("threading")
    return threading is None or threading.active_count() <= 1


def fork_map(fn: Callable[[S], R], shares: list[S]) -> list[R]:
    """[fn(share) for share in shares], shares after the first in children.

    fn's results must be marshallable (builtin types only).
    """
    if not shares:
        return []
    workers = [_fork(fn, sh) for sh in shares[1:]]
    results: list[Any] = []
    failure: BaseException | None = None
    try:
        results.append(fn(shares[0]))
    except BaseException as e:  # the children are reaped first
        failure = e
    for pid, r in workers:
        try:
            results.append(_collect(pid, r))
        except BaseException as e:
            failure = failure or e
    if failure is not None:
        raise failure
    return results


def _fork(fn: Callable[[S], object], share: S) -> tuple[int, int]:
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            # A killed tool leaves no worker behind, still changing its trees.
            die_with_parent(signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
            os.close(r)
            for fd in parent_only:
                os.close(fd)
            data = marshal.dumps(("ok", fn(share)))  # type: ignore[arg-type]
        except errors.CowfsError as e:
            data, code = marshal.dumps(("cowfs", type(e).__name__, str(e))), 1
        except OSError as e:
            data, code = marshal.dumps(("os", e.errno, e.strerror, e.filename)), 1
        except BaseException as e:  # reported to the parent, which raises
            data, code = marshal.dumps(("bug", repr(e))), 1
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> Any:
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"worker {pid} died (wait status {status})")
    result: tuple[Any, ...] = marshal.loads(data)
    kind = result[0]
    if kind == "ok":
        return result[1]
    if kind == "os":
        raise OSError(result[1], result[2], result[3])
    if kind == "cowfs":
        cls = getattr(errors, result[1], errors.CowfsError)
        raise cls(result[2])
    raise RuntimeError(f"worker {pid} failed: {result[1]}")
