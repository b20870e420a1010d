"""vctxd: the one host-side process of every running guest.

VServer kept no process on the host per guest: the kernel was the monitor.
Here one daemon serves every guest's cowfs mount and is the parent of
every guest's init, in one trio loop; the interpreter, trio and cowfs are
paid once per host, not once per guest, and a boot does not start a Python.

`vctx boot` starts it on demand (control.py) and asks it over
/run/vctx/vctxd.sock; it exits once no guest has run for VCTX_DAEMON_IDLE
seconds (default 300).  A flock on /run/vctx/vctxd.lock keeps it alone.
The forker (zygote.py) is its one child that is not a guest's init.

SIGTERM or SIGINT (a host shutting down) stops every guest the way `vctx
stop` does, then the daemon exits.  If the daemon itself dies, its guests'
mounts go with it: `vctx stop` then clears what is left.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import logging
import marshal
import os
import pickle
import signal
import socket
import sys
import threading
from typing import Any

import trio

from cowfs.model import Lru
from cowfs.sys import raise_nofile_limit

from . import cgroups, errors, netctx
from . import sys as k
from .context import Spec
from .home import Home
from .monitor import RUN, BootError, Monitor, children_exited, close_log

SOCK = RUN / "vctxd.sock"
EXEC_SOCK = RUN / "exec.sock"
LOCK = RUN / "vctxd.lock"
LOG = RUN / "vctxd.log"
IDLE = float(os.environ.get("VCTX_DAEMON_IDLE", "300"))
MAX_LINE = 1 << 16
BUSY = 75  # exit code of a start that found another vctxd
log = logging.getLogger("vctx.daemon")


class Reaper:
    """Collects every child's exit (guests' inits, the forker, and a command
    whose `vctx exec` helper was killed) on SIGCHLD, and hands each status
    to whoever waits for that pid, even if the exit came first."""

    RECENT = 256

    def __init__(self) -> None:
        self.waiting: dict[int, trio.Event] = {}
        self.status: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.on_exit: dict[int, Any] = {}

    def reap(self) -> None:
        for pid, status in children_exited():
            self.status[pid] = status
            while len(self.status) > self.RECENT:
                self.status.popitem(last=False)
            ev = self.waiting.pop(pid, None)
            if ev is not None:
                ev.set()
            cb = self.on_exit.pop(pid, None)
            if cb is not None:
                cb()

    async def wait(self, pid: int) -> int:
        if pid not in self.status:
            ev = self.waiting.setdefault(pid, trio.Event())
            self.reap()  # it may have exited before anyone asked
            if pid not in self.status:
                await ev.wait()
        return self.status.pop(pid)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as sigs:
            task_status.started()
            self.reap()
            async for _ in sigs:
                self.reap()


class Forker:
    """The forker process (zygote.py) and the socket to ask it for launchers.
    Used from worker threads: one request at a time."""

    def __init__(self, reaper: Reaper) -> None:
        self.reaper = reaper
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.pid = 0

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.set_inheritable(True)
        argv = [
            sys.executable,
            "-m",
            "vctx.zygote",
            "--control-fd",
            str(theirs.fileno()),
            "--exec-socket",
            str(EXEC_SOCK),
        ]
        self.pid = os.posix_spawn(sys.executable, argv, os.environ)
        theirs.close()
        self.reaper.on_exit[self.pid] = self._died
        ours.settimeout(30)
        if ours.recv(16) != b"ready":
            ours.close()
            raise errors.VctxError("the forker did not start (see /run/vctx/vctxd.log)")
        ours.settimeout(None)
        self.sock = ours
        log.info("forker %d ready", self.pid)

    def _died(self) -> None:
        log.warning("the forker (pid %d) died; it is restarted on the next boot", self.pid)
        with self.lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None

    def launch(self, spec: Spec, plan: netctx.Plan, fds: list[int]) -> int:
        with self.lock:
            if self.sock is None:
                self.start()
            assert self.sock is not None
            socket.send_fds(self.sock, [pickle.dumps((spec, plan))], fds)
            reply = self.sock.recv(32)
        if not reply.isdigit():
            raise errors.VctxError("the forker died while launching")
        return int(reply)

    def close(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close()  # the forker exits on EOF
                self.sock = None


class Daemon:
    def __init__(self) -> None:
        self.reaper = Reaper()
        self.forker = Forker(self.reaper)
        limit = raise_nofile_limit()
        # One budget of cached fds for every tree served: leave room for
        # the mounts, consoles and sockets themselves.
        self.lru = Lru(max(256, (limit - 2048) // 2))
        self.guests: dict[str, Monitor | None] = {}  # None: booting, no monitor yet
        self.changed = trio.Event()
        self.stopping = False

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # --- guests ----------------------------------------------------------------

    async def guest(self, home: Home, name: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Boot the guest, and boot it again on each reboot, until it halts."""
        status, first = task_status, True
        self.guests[name] = None
        self._changed()
        try:
            while True:
                m = None
                try:
                    m = Monitor(home, name, self.forker.launch, self.lru)
                    self.guests[name] = m
                    await trio.to_thread.run_sync(m.prepare)
                    outcome = await m.run(self.reaper.wait, status)
                except Exception as e:
                    if first and (m is None or not m.started):
                        raise  # the boot request fails with it
                    log.exception("%s: failed", name)
                    outcome = f"failed: {e}"
                finally:
                    if m is not None:
                        close_log(m.log)
                first = False
                if outcome != "reboot" or self.stopping:
                    return
                log.info("%s: rebooting", name)
                status = trio.TASK_STATUS_IGNORED
        finally:
            del self.guests[name]
            self._changed()

    async def boot(self, nursery: trio.Nursery, home: Home, name: str) -> tuple[int, str]:
        if name in self.guests:
            raise errors.Running(f"guest {name!r} is already running")
        if self.stopping:
            raise errors.VctxError("vctxd is shutting down")
        await nursery.start(self.guest, home, name)
        m = self.guests.get(name)
        return (m.init_pid, m.g.cfg.init) if m is not None else (0, "")

    async def wait_gone(self, name: str, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while name in self.guests:
                await self.changed.wait()
        return name not in self.guests

    async def stop_all(self) -> None:
        self.stopping = True
        for m in list(self.guests.values()):
            if m is not None and m.started:
                await trio.to_thread.run_sync(m.ask_stop)

    # --- the control socket --------------------------------------------------------

    async def handle(self, nursery: trio.Nursery, conn: trio.SocketStream) -> None:
        async with conn:
            req: dict[str, Any] = {}
            try:
                req = await _read_request(conn)
                reply = await self.dispatch(nursery, req)
            except errors.VctxError as e:
                reply = {"error": str(e), "code": e.exit_code}
            except BootError as e:
                reply = {"error": f"cannot boot {req.get('name')}: {e}", "code": e.code}
            except Exception as e:  # one bad request must not take the daemon down
                log.exception("request failed")
                reply = {"error": f"vctxd: {e}", "code": 1}
            # vctx/fast.py's `vctx boot` takes its reply in marshal: a builtin,
            # where json would cost its start 9 ms of imports.
            out = marshal.dumps(reply) if req.get("reply") == "marshal" else json.dumps(reply).encode() + b"\n"
            try:
                await conn.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def dispatch(self, nursery: trio.Nursery, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "boot":
            init, style = await self.boot(nursery, Home(str(req["home"])), str(req["name"]))
            return {"ok": True, "init": init, "daemon": os.getpid(), "style": style}
        if op == "wait":
            return {"ok": True, "gone": await self.wait_gone(str(req["name"]), float(req["timeout"]))}
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "forker": self.forker.pid, "guests": sorted(self.guests)}
        raise errors.UsageError(f"vctxd: unknown request {op!r}")

    async def serve(self, listener: trio.SocketListener, ready: Any) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.reaper.run)
            await trio.to_thread.run_sync(self.forker.start)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._idle, nursery.cancel_scope)
            ready()
            async with trio.open_nursery() as guests:
                nursery.start_soon(_serve_listener, listener, lambda conn: self.handle(guests, conn))
                await trio.sleep_forever()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                log.info("signal %d: stopping %d guests", sig, len(self.guests))
                await self.stop_all()
                self._changed()

    async def _idle(self, scope: trio.CancelScope) -> None:
        """Exit once no guest ran for IDLE seconds (or, when stopping, at once)."""
        while True:
            if self.guests:
                await self.changed.wait()
                continue
            with trio.move_on_after(0 if self.stopping else IDLE):
                await self.changed.wait()
                continue
            if not self.guests:
                log.info("no guests: exiting")
                scope.cancel()
                return


async def _serve_listener(listener: trio.SocketListener, handler: Any) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            conn = await listener.accept()
            nursery.start_soon(handler, conn)


async def _read_request(conn: trio.SocketStream) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await conn.receive_some(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ValueError("request too long")
    req = json.loads(buf)
    if not isinstance(req, dict):
        raise ValueError("a request is a JSON object")
    return req


def main(argv: list[str] | None = None) -> None:
    """Start vctxd in the background; exit 0 once it serves, 75 if another
    one holds the lock (the caller retries), 1 if it failed (see the log)."""
    ap = argparse.ArgumentParser(prog="vctx.daemon")
    ap.add_argument("--foreground", action="store_true")
    args = ap.parse_args(argv)
    RUN.mkdir(parents=True, exist_ok=True)
    if args.foreground:
        run(None)
        return
    r, w = os.pipe()
    if os.fork() == 0:  # the daemon: before any thread, out of the caller's session
        os.close(r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        for fd, src in ((0, null), (1, out), (2, out)):
            os.dup2(src, fd)
        os.close(null)
        os.close(out)
        try:
            run(w)
        except BaseException:
            os._exit(1)
        os._exit(0)
    os.close(w)
    msg = b""
    while chunk := os.read(r, 64):
        msg += chunk
    if msg == b"ok":
        sys.exit(0)
    if msg == b"busy":
        sys.exit(BUSY)
    sys.stderr.write(f"vctxd: {msg.decode(errors='replace') or 'died at start'} (see {LOG})\n")
    sys.exit(1)


def run(ready_fd: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vctxd[%(process)d] %(message)s")

    def tell(msg: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)
            ready_fd = None

    lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        tell("busy")  # another vctxd serves (or is on its way out)
        return
    # Guests' inits become our children when their launchers exit.
    k.prctl(k.PR_SET_CHILD_SUBREAPER, 1)
    try:
        log.info("in cgroups %s", " ".join(map(str, cgroups.move_daemon(os.getpid()))))
    except OSError as e:  # still serves; only a kill of the starter's cgroup would reach it
        log.warning("cannot move to a cgroup of its own: %s", e)
    SOCK.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        sock.bind(str(SOCK))
    finally:
        os.umask(old)
    sock.listen(128)
    daemon = Daemon()
    log.info("serving on %s", SOCK)

    async def amain() -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        try:
            await daemon.serve(listener, lambda: tell("ok"))
        finally:
            # New clients must find no daemon (and start one) from here on.
            SOCK.unlink(missing_ok=True)
            await listener.aclose()
            daemon.forker.close()

    try:
        trio.run(amain)
    except BaseException as e:
        log.exception("vctxd failed")
        tell(f"failed: {e}")
        raise
    log.info("exited")


if __name__ == "__main__":
    main()
