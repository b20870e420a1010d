"""exec and enter: run a command inside a running guest.

The calling process joins the guest's cgroups, then its user, mount, UTS,
IPC, PID and cgroup namespaces through a pidfd of the guest's init (one
setns call), and forks: the child is a process of the guest in every
respect, drops to the guest's capability bounds and the chosen user, and
execs.  With a tty, the caller opens a pty *in the guest's* devpts, gives
the child the slave and proxies the host terminal to the master: the guest
never holds the host's terminal.
"""

from __future__ import annotations

import errno
import fcntl  # all imports at the top: after setns the guest's root is ours
import os
import resource
import select
import signal
import stat
import sys
import termios
import tomllib
import tty as ttymod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from . import config, errors
from . import sys as k
from .cgroups import GuestCgroups
from .context import CAP_DROP, confine, default_signals
from .home import Home
from .monitor import PATH
from .runtime import running

TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
NS = k.CLONE_NEWUSER | k.CLONE_NEWNS | k.CLONE_NEWUTS | k.CLONE_NEWIPC | k.CLONE_NEWPID | k.CLONE_NEWCGROUP


def _passwd(user: str) -> tuple[int, int, str, str, str]:
    """(uid, gid, name, home, shell) from the guest's /etc/passwd."""
    try:
        lines = Path("/etc/passwd").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        f = line.split(":")
        if len(f) < 7 or not f[2].isdigit() or not f[3].isdigit():
            continue
        if f[0] == user or (user.isdigit() and f[2] == user):
            return int(f[2]), int(f[3]), f[0], f[5] or "/", f[6] or "/bin/sh"
    if user.isdigit():
        return int(user), int(user), user, "/", "/bin/sh"
    raise errors.NotFound(f"no user {user!r} in the guest")


def _groups(name: str, gid: int) -> list[int]:
    out = {gid}
    try:
        for line in Path("/etc/group").read_text(errors="replace").splitlines():
            f = line.split(":")
            if len(f) >= 4 and f[2].isdigit() and name in f[3].split(","):
                out.add(int(f[2]))
    except OSError:
        pass
    return sorted(out)


def _join(name: str, init: int) -> None:
    cg = GuestCgroups(name)
    for node in cg.nodes():
        try:
            (node / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as e:
            if e.errno != errno.EBUSY or node != cg.v2:
                raise
            # The guest's systemd enabled controllers at its root: no
            # process may sit there, so execs get a leaf of their own.
            leaf = node / "vctx-exec"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
    fd = os.pidfd_open(init)
    try:
        # A guest with a network namespace of its own (netns, none) has it joined too.
        own_net = os.stat(f"/proc/{init}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        k.setns(fd, NS | (k.CLONE_NEWNET if own_net else 0))
    finally:
        os.close(fd)
    # Host root is no id at all in the guest's user namespace: become its root,
    # so what we create there (the pty) belongs to someone the guest knows.
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


@dataclass
class Target:
    """What a command run in a guest becomes, worked out after joining it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: list[int]
    rlimits: dict[int, tuple[int, int]]
    workdir: str
    confine: bool  # the isolated network's Landlock scope and sock_diag rule
    allow_syscalls: tuple[str, ...]  # what the guest's seccomp filter lets through after all


def guest_rlimits(read: Callable[[], str]) -> dict[int, tuple[int, int]]:
    """The rlimits of guest.toml as read() returns it; a config that changed
    into something broken while the guest runs gives none (the caller's stay)."""
    try:
        return config.from_dict(tomllib.loads(read())).resource_limits()
    except (OSError, tomllib.TOMLDecodeError, errors.VctxError):
        return {}


def join_guest(
    home: Home,
    name: str,
    argv: list[str],
    user: str = "root",
    env: dict[str, str] | None = None,
    workdir: str | None = None,
    tty: bool = False,
    login: bool = False,
) -> Target:
    """Join the guest's cgroups and namespaces, for good; the child forked
    next is in its PID namespace and runs become()."""
    r = running(name)
    if r is None or (r.home and Path(r.home) != home.root):
        raise errors.NotRunning(f"guest {name!r} is not running")
    rlimits = guest_rlimits((home.guest(name) / "guest.toml").read_text)
    _join(name, r.init)
    return target(name, argv, user, env, workdir, tty, login, rlimits, r.net == "isolated", r.allow_syscalls)


def target(
    name: str,
    argv: list[str],
    user: str,
    env: dict[str, str] | None,
    workdir: str | None,
    tty: bool,
    login: bool,
    rlimits: dict[int, tuple[int, int]],
    confine: bool,
    allow_syscalls: tuple[str, ...],
) -> Target:
    """What argv becomes, looked up inside the guest (its passwd and group)."""
    uid, gid, uname, uhome, shell = _passwd(user)
    if login:
        argv = [shell, "-l"]
    e = {
        "PATH": PATH,
        "HOME": uhome,
        "USER": uname,
        "LOGNAME": uname,
        "SHELL": shell,
        "container": "vctx",
        "TERM": os.environ.get("TERM", "xterm") if tty else "dumb",
    }
    e.update(env or {})
    wd = workdir or (uhome if login else "/")
    return Target(name, argv, e, uid, gid, _groups(uname, gid), rlimits, wd, confine, allow_syscalls)


def bound(t: Target) -> None:
    """What every process of the guest carries, whoever it runs as: the
    capability bounds and the seccomp filter (with, isolated, the Landlock
    scope).  A standby takes them on once for all its commands."""
    k.drop_bounding(list(CAP_DROP.values()))
    confine(t.confine, t.allow_syscalls)


def become(t: Target, bounded: bool = False) -> NoReturn:
    """In the forked child: the guest's limits, capability bounds and user, then exec."""
    try:
        for res, lim in t.rlimits.items():  # the guest's limits, as its init has them
            resource.setrlimit(res, lim)
        if not bounded:
            bound(t)
        os.setgroups(t.groups)
        os.setresgid(t.gid, t.gid, t.gid)
        os.setresuid(t.uid, t.uid, t.uid)
        os.chdir(t.workdir)
        default_signals()
        os.execvpe(t.argv[0], t.argv, t.env)
    except OSError as ex:
        code, msg = cannot_run(t, ex)
        os.write(2, msg.encode())
        os._exit(code)
    except BaseException as ex:
        os.write(2, f"vctx: cannot run {t.argv[0]} in {t.name}: {ex}\n".encode())
        os._exit(126)


def cannot_run(t: Target, ex: OSError) -> tuple[int, str]:
    """A shell's exit code (127 not found, 126 else) and its message for a
    command that could not be run."""
    if ex.filename == t.workdir:
        return 126, f"vctx: cannot change to {t.workdir} in {t.name}: {ex.strerror}\n"
    if isinstance(ex, FileNotFoundError):
        return 127, f"vctx: {t.argv[0]}: command not found in {t.name}\n"
    return 126, f"vctx: cannot run {t.argv[0]} in {t.name}: {ex.strerror}\n"


def can_spawn(t: Target) -> bool:
    """A bound standby can start t itself, without forking Python: it runs
    as the guest's root with the limits the standby already has."""
    return t.uid == 0 and t.gid == 0 and not t.rlimits


# every signal a child may have reset to its default disposition on exec
_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def spawn(t: Target, stdio: list[int]) -> int:
    """From a bound standby (can_spawn): t as a child, by posix_spawn (vfork
    and exec: nothing of the standby's Python heap is copied or touched).
    Returns its pid; a command that cannot be run is an OSError (cannot_run
    says what to tell)."""
    os.setgroups(t.groups)
    os.chdir(t.workdir)
    path = _which(t.argv[0], t.env.get("PATH", PATH))
    actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)]
    return os.posix_spawn(path, t.argv, t.env, file_actions=actions, setsigmask=(), setsigdef=_SIGNALS)


def _which(cmd: str, path: str) -> str:
    """cmd looked up in the guest's PATH, as execvp would (posix_spawnp
    would search the standby's own PATH, the host's)."""
    if "/" in cmd:
        return cmd
    denied = None
    for d in path.split(":"):
        p = os.path.join(d or ".", cmd)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(p, os.X_OK):
            return p
        denied = p
    if denied is not None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cmd)


def exit_code(status: int) -> int:
    """A wait status as a shell shows it: 128+N if killed by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def exec_in(
    home: Home,
    name: str,
    argv: list[str],
    user: str = "root",
    env: dict[str, str] | None = None,
    workdir: str | None = None,
    tty: bool = False,
    stdio: bool = True,
    login: bool = False,
) -> int:
    """Run argv in the guest from this process (which joins it for good);
    returns its exit code."""
    t = join_guest(home, name, argv, user, env, workdir, tty, login)
    master = slave = -1
    if tty:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)

        fcntl.ioctl(master, TIOCSPTLCK, b"\0\0\0\0")  # unlockpt
        n = int.from_bytes(fcntl.ioctl(master, TIOCGPTN, b"\0\0\0\0"), sys.byteorder)
        slave = os.open(f"/dev/pts/{n}", os.O_RDWR | os.O_NOCTTY)
        os.fchown(slave, t.uid, -1)
        _copy_winsize(master)
    pid = os.fork()
    if pid == 0:
        if tty:
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
        elif not stdio:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
        become(t)
    if tty:
        os.close(slave)
        _proxy(master, pid)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    return exit_code(status)


def _copy_winsize(master: int) -> None:

    try:
        ws = fcntl.ioctl(sys.stdin.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, ws)
    except OSError:
        pass


def _proxy(master: int, pid: int) -> None:
    """Host terminal <-> the guest's pty master, until the child's side closes."""

    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        ttymod.setraw(stdin)
    signal.signal(signal.SIGWINCH, lambda *_: _copy_winsize(master))
    fds = [master, stdin]
    try:
        while True:
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 65536)
                if not data:
                    fds.remove(stdin)  # keep showing output after our input ends
                    os.write(master, b"\x04")
                else:
                    os.write(master, data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        os.close(master)
