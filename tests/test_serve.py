"""The serving loop as vctxd runs it: a mount served from a thread of a
trio program, which may give up serving while the mount is still in use."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import trio
from conftest import cowfs

from cowfs.daemon import MountOptions, Served


def test_a_cancelled_serve_returns_though_its_mount_is_in_use(template: Path, tmp_path: Path) -> None:
    """Between requests the serving thread sleeps in a read of /dev/fuse
    that only a request ends.  When vctxd gives up a guest's mount (it is
    shutting down) while a process of the guest still has it open, stop()
    must end that read: the kernel answers its retrieve with a request."""
    backing, mnt = tmp_path / "g", tmp_path / "m"
    cowfs("clone", str(template), str(backing))
    mnt.mkdir()
    served = Served(str(backing), str(mnt), MountOptions())
    holder: list[int] = []  # keeps the connection once the mount is detached
    answered: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started = trio.Event()

            async def guest() -> None:
                holder.append(await trio.to_thread.run_sync(os.open, mnt / "etc", os.O_RDONLY | os.O_DIRECTORY))
                answered.append((await trio.to_thread.run_sync(os.stat, mnt / "etc/hostname")).st_size > 0)
                started.set()
                await trio.sleep_forever()

            nursery.start_soon(served.serve, guest)
            await started.wait()
            nursery.cancel_scope.cancel()

    runner = threading.Thread(target=trio.run, args=(main,), daemon=True)
    runner.start()
    runner.join(60)  # (a guard: a hung serve() fails the test instead of hanging the suite)
    hung = runner.is_alive()
    for fd in holder:
        os.close(fd)  # the connection ends: a hung serve() would return now
    runner.join()
    served.close()
    assert answered == [True]
    assert not hung, "serve() did not return once stopped"
    assert served.session.finished.is_set()
