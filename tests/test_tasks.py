"""The scheduler link breaks run on (cowfs/tasks.py), driven the way a
serving thread drives it: spawn, then collect() each time its eventfd fires."""

from __future__ import annotations

import errno
import select
import threading

import pytest

from cowfs.tasks import Lock, Scheduler, to_thread


def drive(sched: Scheduler) -> None:
    """What fuse.Session.serve does with the scheduler, until nothing is in flight."""
    ep = select.epoll()
    ep.register(sched.wake_fd, select.EPOLLIN)
    try:
        while sched.in_flight:
            ep.poll()
            sched.collect()
    finally:
        ep.close()


def test_results_errors_and_fifo_lock_handover() -> None:
    sched = Scheduler()
    lock = Lock()
    gate = threading.Event()
    order: list[str] = []
    outcomes: dict[str, tuple[object, BaseException | None]] = {}

    async def holder(name: str) -> str:
        async with lock:
            order.append(f"{name} in")
            await to_thread(gate.wait)  # the lock stays held across the worker
            order.append(f"{name} out")
        return name

    async def failing() -> None:
        await to_thread(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))

    def done(name: str) -> object:
        return lambda out, err: outcomes.__setitem__(name, (out, err))

    for name in ("a", "b", "c"):
        sched.spawn(holder(name), done(name))
    sched.spawn(failing(), done("f"))
    assert order == ["a in"] and len(lock.waiters) == 2  # b and c wait, in order
    gate.set()
    drive(sched)
    assert order == ["a in", "a out", "b in", "b out", "c in", "c out"]
    assert {k: v[0] for k, v in outcomes.items() if k != "f"} == {"a": "a", "b": "b", "c": "c"}
    err = outcomes["f"][1]
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert not lock.held
    sched.shutdown()
    sched.close()


def test_awaiting_anything_else_is_a_bug() -> None:
    import trio

    sched = Scheduler()

    async def wrong() -> None:
        await trio.sleep(0)

    with pytest.raises(RuntimeError, match="only trio knows"):
        sched.spawn(wrong(), lambda out, err: None)
    sched.shutdown()
    sched.close()
