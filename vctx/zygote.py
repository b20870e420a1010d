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
from .enter import become, exit_code, join_guest
from .home import Home
from .monitor import launcher

MAX_REQUEST = 1 << 20
SO_PEERCRED = struct.Struct("iII")
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


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _recv(sock: socket.socket, nfds: int) -> tuple[bytes, list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_REQUEST, nfds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EMSGSIZE, "request too large")
    for fd in fds:  # SCM_RIGHTS fds arrive inheritable: init's exec must close the error pipe
        os.set_inheritable(fd, False)
    return data, fds


def _child_setup(keep: socket.socket | None) -> None:
    """In every child: the daemon's signal handling is not theirs, and the
    forker's sockets are closed (the child must not keep them alive)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for s in _OPEN:
        if s is not keep:
            s.close()


_OPEN: list[socket.socket] = []


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
    pid = os.fork()
    if pid == 0:
        _child_setup(None)
        launcher(spec, plan, *fds)
    for fd in fds:
        os.close(fd)
    control.send(str(pid).encode())
    return True


def _exec(conn: socket.socket) -> NoReturn:
    """A child serving one `vctx exec`: join, fork the command, wait, report."""
    _child_setup(conn)
    code = 0
    try:
        uid = SO_PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SO_PEERCRED.size))[1]
        if uid != 0:
            raise errors.UsageError("only root may run commands in guests")
        data, stdio = _recv(conn, 3)
        if len(stdio) != 3:
            raise errors.UsageError("the request did not carry stdin, stdout and stderr")
        req = marshal.loads(data)
        t = join_guest(Home(req["home"]), req["name"], req["argv"], req["user"], req["env"], req["workdir"])
        pid = os.fork()
        if pid == 0:
            for i, fd in enumerate(stdio):
                os.dup2(fd, i)
            os.closerange(3, 1 << 16)
            become(t)
        for fd in stdio:
            os.close(fd)
        conn.send(b"x%d" % _wait(conn, pid))
    except errors.VctxError as e:
        code = 1
        _say(conn, f"E{e.exit_code} {e}")
    except OSError as e:
        code = 1
        _say(conn, f"E1 {e.strerror or e}")
    except Exception as e:
        code = 1
        _say(conn, f"E1 {e}")
    os._exit(code)


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
    while True:
        for fd, _ in poll.poll():
            if fd == pidfd:
                _, status = os.waitpid(pid, 0)
                os.close(pidfd)
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


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def serve(control: socket.socket, listener: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, _reap)
    _OPEN.extend((control, listener))
    control.send(b"ready")
    while True:
        try:
            ready, _, _ = select.select([control, listener], [], [])
        except InterruptedError:
            continue
        if control in ready and not _launch(control):
            return
        if listener in ready:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if os.fork() == 0:
                _exec(conn)
            conn.close()


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
    seccomp.build()  # once, here: every exec child would build it again
    serve(control, listener)
    sys.exit(0)


if __name__ == "__main__":
    main()
