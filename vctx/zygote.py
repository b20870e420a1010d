"""The forker: the one single-threaded process that forks into guests.

vctxd is a trio program with worker threads; a process that forks while
other threads run and then keeps running Python in the child inherits
whatever locks those threads held.  So vctxd execs this small process once,
and every fork that goes on running Python happens here:

- a guest's launcher (monitor.launcher), asked for by vctxd over a socket
  pair, with the launcher's three pipes passed along;
- `vctx exec`: the client connects to exec.sock and passes its stdin,
  stdout and stderr with the request; a forked child joins the guest (its
  cgroups, then its namespaces), forks the command into the guest's PID
  namespace with the client's fds as its stdio, forwards the signals the
  client relays, and reports the exit code.  The client is a bare Python
  (vctx/fast.py): no import it does not need.

Joining is the slow part of an exec: the first move of a process into a
cgroup waits for an RCU grace period (~7 ms here).  So the child that
served a guest's exec stays, already joined, as that guest's *standby* and
serves its next execs too; it leaves after STANDBY_IDLE seconds without
one, or as soon as the guest's init is gone (a reboot or a stop: it must
not keep the guest's cgroup populated).  A guest has at most one standby;
concurrent execs get children of their own.

Forking is the next slowest part: the child of a Python process copies
every page it touches (reference counts make that most of them), ~3 ms
before the command even starts.  So a standby takes on, once, what every
process of the guest carries (capability bounds, seccomp filter), and
starts guest root's commands with posix_spawn (vfork and exec: the Python
heap is neither copied nor touched); another user, or limits of its own,
still take a forked child.

Only root may connect (the socket is 0600, and the peer's uid is checked).
"""

from __future__ import annotations

import argparse
import errno
import marshal
import os
import pickle
import select
import signal
import socket
import struct
import sys
from typing import NoReturn

from . import errors, seccomp
from . import sys as k
from .enter import Target, become, bound, can_spawn, cannot_run, exit_code, guest_rlimits, join_guest, spawn, target
from .files import write_atomic
from .home import Home
from .monitor import children_exited, launcher, standby_path
from .runtime import running

MAX_REQUEST = 1 << 20
SO_PEERCRED = struct.Struct("iII")
STANDBY_IDLE = float(os.environ.get("VCTX_EXEC_STANDBY", "60"))
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
)
# Every socket the forker holds: each child closes all but its own.
_OPEN: set[socket.socket] = set()


def _reap(*_: object) -> None:
    for _child in children_exited():
        pass


def _recv(sock: socket.socket, nfds: int) -> tuple[bytes, list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_REQUEST, nfds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EMSGSIZE, "request too large")
    for fd in fds:  # SCM_RIGHTS fds arrive inheritable: init's exec must close the error pipe
        os.set_inheritable(fd, False)
    return data, fds


def _fork_child(keep: socket.socket | None) -> int:
    """fork(); in the child, the forker's signal handling and sockets are
    not its own (it must not keep them alive)."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for s in _OPEN:
            if s is not keep:
                s.close()
    return pid


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _launch(control: socket.socket) -> bool:
    """One launch request from vctxd: fork the launcher, reply with its pid."""
    try:
        data, fds = _recv(control, 3)
    except OSError:
        return False
    if not data:
        return False  # vctxd is gone
    spec, plan = pickle.loads(data)
    if plan.own_netns:
        import pyroute2  # type: ignore[import-untyped]  # noqa: F401 - the launcher configures its namespace with it
    pid = _fork_child(None)
    if pid == 0:
        launcher(spec, plan, *fds)
    _close(fds)
    control.send(str(pid).encode())
    return True


class Server:
    """The forker's one loop: vctxd's launch requests, exec clients, and the
    standbys' word that they are free again (or gone)."""

    def __init__(self, control: socket.socket, listener: socket.socket) -> None:
        self.control, self.listener = control, listener
        self.idle: dict[str, socket.socket] = {}  # standbys waiting, by guest
        self.busy: dict[socket.socket, str] = {}  # standbys (or children to become one) serving
        self.pids: dict[socket.socket, tuple[str, int]] = {}  # each standby's guest and pid
        _OPEN.update((control, listener))

    def serve(self) -> None:
        while True:
            # standbys first: one that is free again serves the request that came with it
            watched = [*self.busy, *self.idle.values(), self.control, self.listener]
            try:
                ready, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            for s in ready:
                if s is self.control:
                    if not _launch(self.control):
                        return
                elif s is self.listener:
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    self.route(conn)
                else:
                    self.standby_says(s)

    def standby_says(self, chan: socket.socket) -> None:
        try:
            msg = chan.recv(16)
        except OSError:
            msg = b""
        name = self.busy.pop(chan, None)
        if msg == b"free" and name is not None and name not in self.idle:
            self.idle[name] = chan
            return
        for n, c in list(self.idle.items()):  # it left
            if c is chan:
                del self.idle[n]
        left = self.pids.pop(chan, None)
        if left is not None:
            _standby_file(*left, present=False)
        _OPEN.discard(chan)
        chan.close()

    def route(self, conn: socket.socket) -> None:
        """Read the request (the client sends it at once), then give it to
        the guest's standby, or to a new child."""
        fds: list[int] = []
        try:
            uid = SO_PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SO_PEERCRED.size))[1]
            if uid != 0:
                raise errors.UsageError("only root may run commands in guests")
            conn.settimeout(5.0)
            data, fds = _recv(conn, 3)
            conn.settimeout(None)
            if len(fds) != 3:
                raise errors.UsageError("the request did not carry stdin, stdout and stderr")
            req = marshal.loads(data)
            name = str(req["name"])
        except (OSError, ValueError, EOFError, TypeError, KeyError, errors.VctxError) as e:
            _say(conn, f"E{getattr(e, 'exit_code', 1)} {e}")
            _close(fds)
            conn.close()
            return
        chan = self.idle.pop(name, None)
        if chan is not None:
            try:
                # The standby cannot read the host's files any more: its limits come with the request.
                req["rlimits"] = guest_rlimits((Home(str(req["home"])).guest(name) / "guest.toml").read_text)
                socket.send_fds(chan, [marshal.dumps(req)], [conn.fileno(), *fds])
                self.busy[chan] = name
                _close(fds)
                conn.close()
                return
            except OSError:
                _OPEN.discard(chan)
                chan.close()
        mine = theirs = None
        if name not in self.busy.values():  # it will stay as the guest's standby
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            _OPEN.add(mine)
        pid = _fork_child(theirs)
        if pid == 0:
            _exec_child(conn, data, fds, theirs)
        if theirs is not None and mine is not None:
            theirs.close()
            self.busy[mine] = name
            self.pids[mine] = (name, pid)
            _standby_file(name, pid, present=True)
        _close(fds)
        conn.close()


def _standby_file(name: str, pid: int, present: bool) -> None:
    """RUN/NAME/standby names the guest's standby while it lives: it sits in
    the guest's cgroup, and `vctx list` does not count it as the guest's."""
    path = standby_path(name)
    try:
        if present:
            write_atomic(path, f"{pid}\n".encode(), 0o600, durable=False)
        elif path.read_text().strip() == str(pid):
            path.unlink()
    except OSError:
        pass  # the guest stopped: its run directory is gone, and this with it


def _exec_child(conn: socket.socket, data: bytes, stdio: list[int], chan: socket.socket | None) -> NoReturn:
    """Join the guest, serve this exec, then (with a channel) stay as the
    guest's standby until its init is gone or STANDBY_IDLE passes."""
    try:
        req = marshal.loads(data)
        home, name = Home(req["home"]), str(req["name"])
        r = running(name)
        if r is None:
            raise errors.NotRunning(f"guest {name!r} is not running")
        init_fd = os.pidfd_open(r.init)
        t = join_guest(home, name, req["argv"], req["user"], req["env"], req["workdir"])
    except Exception as e:
        _fail(conn, e)
        os._exit(1)
    _run(conn, stdio, t)
    conn.close()
    if chan is None:
        os._exit(0)
    confine, allow_syscalls = t.confine, t.allow_syscalls
    # From here on the standby starts most commands itself (spawn): it
    # carries the bounds every guest process gets, and none of its fds
    # may leak into them.
    try:
        bound(t)
        k.cloexec_from(3)
    except OSError:
        os._exit(0)  # the forker makes another one
    poll = select.poll()
    poll.register(chan.fileno(), select.POLLIN)
    poll.register(init_fd, select.POLLIN)
    while True:
        try:
            chan.send(b"free")
        except OSError:
            os._exit(0)
        ready = dict(poll.poll(STANDBY_IDLE * 1000))
        if not ready or init_fd in ready:
            os._exit(0)  # idle, or the guest's init is gone (this context with it)
        try:
            msg, fds = _recv(chan, 4)
        except OSError:
            os._exit(0)
        if not msg or len(fds) != 4:
            os._exit(0)
        conn = socket.socket(fileno=fds[0])
        try:
            req = marshal.loads(msg)
            if req["name"] != name or Home(req["home"]).root != home.root:
                raise errors.NotRunning(f"guest {req['name']!r} is not running")
            t = target(
                name,
                req["argv"],
                req["user"],
                req["env"],
                req["workdir"],
                False,
                False,
                req["rlimits"],
                confine,
                allow_syscalls,
            )
        except Exception as e:
            _fail(conn, e)
            _close(fds[1:])
            conn.close()
            continue
        _run(conn, fds[1:], t, bounded=True)
        conn.close()


def _run(conn: socket.socket, stdio: list[int], t: Target, bounded: bool = False) -> None:
    """Start the command with the client's stdio, wait, report its exit code.

    A bound standby spawns guest root's commands itself (vfork and exec);
    others are forked, and the child becomes their user and limits first."""
    try:
        if bounded and can_spawn(t):
            try:
                pid = spawn(t, stdio)
            except OSError as ex:
                code, msg = cannot_run(t, ex)
                os.write(stdio[2], msg.encode())
                _close(stdio)
                conn.send(b"x%d" % code)
                return
        else:
            pid = os.fork()
            if pid == 0:
                for i, fd in enumerate(stdio):
                    os.dup2(fd, i)
                os.closerange(3, 1 << 16)
                become(t, bounded)
        _close(stdio)
        conn.send(b"x%d" % _wait(conn, pid))
    except Exception as e:
        _fail(conn, e)


def _fail(conn: socket.socket, e: BaseException) -> None:
    if isinstance(e, errors.VctxError):
        _say(conn, f"E{e.exit_code} {e}")
    elif isinstance(e, OSError):
        _say(conn, f"E1 {e.strerror or e}")
    else:
        _say(conn, f"E1 {e}")


def _say(conn: socket.socket, msg: str) -> None:
    try:
        conn.send(msg.encode())
    except OSError:
        pass


def _wait(conn: socket.socket, pid: int) -> int:
    """The command's exit code; meanwhile the signals the client relays go to
    it, and a client that goes away hangs it up."""
    pidfd = os.pidfd_open(pid)
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    poll.register(conn.fileno(), select.POLLIN)
    try:
        while True:
            for fd, _ in poll.poll():
                if fd == pidfd:
                    _, status = os.waitpid(pid, 0)
                    return exit_code(status)
                try:
                    msg = conn.recv(64)
                except OSError:
                    msg = b""
                if not msg:
                    poll.unregister(conn.fileno())
                    _signal(pid, signal.SIGHUP)
                elif msg[:1] == b"s" and msg[1:].isdigit() and int(msg[1:]) in FORWARDED:
                    _signal(pid, int(msg[1:]))
    finally:
        os.close(pidfd)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="vctx.zygote")
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--exec-socket", required=True)
    args = ap.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    control.set_inheritable(False)
    # vctxd holds its lock: a socket file there now is a dead daemon's
    try:
        os.unlink(args.exec_socket)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        listener.bind(args.exec_socket)
    finally:
        os.umask(old)
    listener.listen(64)
    for net in (False, True):  # the usual filters once, here: every child would build them again
        seccomp.build(net, frozenset())
    signal.signal(signal.SIGCHLD, _reap)
    control.send(b"ready")
    Server(control, listener).serve()
    sys.exit(0)


if __name__ == "__main__":
    main()
