"""The few requests that may block (a link break copies a file's data) run
as coroutines on this small scheduler, inside the thread that serves their
mount.

Why not trio: a FUSE request is answered in ~5 us of Python, and waking a
trio task for it costs about as much again (run loop, epoll re-arming,
rescheduling).  The serving thread blocks in epoll itself, and only what
must wait — a copy in a worker thread, or a node's lock held by another
break — leaves the fast path.  A coroutine here awaits only `to_thread` and
`Lock`; it is resumed in the serving thread, under the model's lock, so
between two awaits it is as atomic as any other handler.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")

Done = Callable[[object, BaseException | None], None]  # (result, error): the coroutine's outcome


class _Task:
    __slots__ = ("coro", "done", "sched")

    def __init__(self, coro: Coroutine[Any, Any, Any], done: Done, sched: Scheduler) -> None:
        self.coro, self.done, self.sched = coro, done, sched


class _Offload(Generic[T]):
    """Awaited: run fn(*args) in a worker thread, resume with its result."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __await__(self) -> Generator[Any, Any, T]:
        result: T = yield self
        return result


def to_thread(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
    return _Offload(fn, args)


class _Acquire:
    __slots__ = ("lock",)

    def __init__(self, lock: Lock) -> None:
        self.lock = lock

    def __await__(self) -> Generator[Any, Any, None]:
        yield self


class Lock:
    """A FIFO lock for coroutines of one scheduler: released, it passes
    straight to the first waiter."""

    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.waiters: deque[_Task] = deque()

    async def __aenter__(self) -> None:
        if self.held:
            await _Acquire(self)  # resumed holding it
        else:
            self.held = True

    async def __aexit__(self, *exc: object) -> None:
        if self.waiters:
            task = self.waiters.popleft()
            task.sched.ready.append((task, None, None))
        else:
            self.held = False


class Scheduler:
    """Coroutines of one serving thread.  run_ready() and collect() are
    called by that thread only, holding the model's lock; workers only
    append to `finished` and poke `wake_fd` (an eventfd the thread polls)."""

    def __init__(self, workers: int = 4) -> None:
        self.ready: deque[tuple[_Task, object, BaseException | None]] = deque()
        self.finished: deque[tuple[_Task, object, BaseException | None]] = deque()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cowfs-copy")
        self.in_flight = 0

    def spawn(self, coro: Coroutine[Any, Any, Any], done: Done) -> None:
        self.in_flight += 1
        self._step(_Task(coro, done, self), None, None)

    def _step(self, task: _Task, value: object, error: BaseException | None) -> None:
        try:
            awaited = task.coro.throw(error) if error is not None else task.coro.send(value)
        except StopIteration as stop:
            self.in_flight -= 1
            task.done(stop.value, None)
            return
        except Exception as e:
            self.in_flight -= 1
            task.done(None, e)
            return
        if isinstance(awaited, _Offload):
            self.pool.submit(self._work, task, awaited)
        elif isinstance(awaited, _Acquire):
            awaited.lock.waiters.append(task)
        else:
            self.in_flight -= 1
            task.coro.close()
            raise RuntimeError(f"a cowfs task awaited {awaited!r}, which only trio knows")

    def _work(self, task: _Task, job: _Offload[Any]) -> None:
        try:
            outcome: tuple[_Task, object, BaseException | None] = (task, job.fn(*job.args), None)
        except BaseException as e:
            outcome = (task, None, e)
        self.finished.append(outcome)
        self.wake()

    def collect(self) -> None:
        """Resume what the workers finished and what a lock handed over."""
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        while self.finished:
            self.ready.append(self.finished.popleft())
        self.run_ready()

    def run_ready(self) -> None:
        while self.ready:
            self._step(*self.ready.popleft())

    def wake(self) -> None:
        os.eventfd_write(self.wake_fd, 1)

    def shutdown(self) -> None:
        """Workers gone; wake_fd stays open until close() (another thread may still wake us)."""
        self.pool.shutdown(wait=True)

    def close(self) -> None:
        os.close(self.wake_fd)
