"""Inside the new context: the guest's root, /proc, /sys, /dev, then init.

This runs in the process that becomes the guest's PID 1, after it entered
its user, mount, PID, UTS, IPC and cgroup namespaces and became root of its
user namespace.  Nothing here can touch the host: every mount is made in
the guest's own mount namespace, and the old root is detached at the end.
"""

from __future__ import annotations

import fcntl  # imported here: nothing can be imported after pivot_root
import os
import resource
import signal
import stat
import termios
from dataclasses import dataclass, field

from . import seccomp
from . import sys as k

# Host device nodes a guest may have (bind-mounted: a user namespace cannot mknod).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# /proc entries that tell about or act on the host.
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "sysrq-trigger", "kallsyms", "kmsg")
PROC_READONLY = ("sys", "irq", "bus", "fs")
# Capabilities no VPS root needs even inside its user namespace; the rest
# only act on the guest's own namespaces.
CAP_DROP = {
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_TIME": 25,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_CONTROL": 30,
}


@dataclass
class Spec:
    root: str  # the guest's cowfs mount, seen from the host's mount namespace
    hostname: str
    argv: list[str]
    console: str  # the host-held pty's slave, to become /dev/console
    env: dict[str, str] = field(default_factory=dict)
    rlimits: dict[int, tuple[int, int]] = field(default_factory=dict)
    net_confined: bool = False  # isolated network: the host's stack, confined
    allow_syscalls: tuple[str, ...] = ()  # of those seccomp.py refuses
    own_netns: bool = False  # netns and none: sysfs of its own


def _bind(src: str, dst: str, flags: int = 0) -> None:
    k.mount(src, dst, None, k.MS_BIND | flags)


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _mkdir(path: str, mode: int = 0o755) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass


def setup_root(spec: Spec) -> None:
    r = spec.root
    # Nothing we mount may propagate back to the host.
    k.mount("none", "/", None, k.MS_REC | k.MS_PRIVATE)
    _bind(r, r, k.MS_REC)
    for d in ("proc", "sys", "dev", "run", "tmp"):
        _mkdir(f"{r}/{d}")
    k.mount("proc", f"{r}/proc", "proc", k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC)
    # sysfs can be mounted fresh only in a network namespace of our own;
    # otherwise the host's, read-only.  Our cgroup2 subtree goes on top.
    if spec.own_netns:
        k.mount("sysfs", f"{r}/sys", "sysfs", k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC)
    else:
        _bind("/sys", f"{r}/sys", k.MS_REC)
        k.make_readonly_recursive(f"{r}/sys")
    if os.path.isdir(f"{r}/sys/fs/cgroup"):
        k.mount("cgroup2", f"{r}/sys/fs/cgroup", "cgroup2", k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC)
    _setup_dev(r, spec.console)
    k.mount("tmpfs", f"{r}/run", "tmpfs", k.MS_NOSUID | k.MS_NODEV, "mode=755,size=20%")
    # pivot_root(".", "."): the old root ends up on top of the new one, then goes
    os.chdir(r)
    k.pivot_root(".", ".")
    k.umount(".", lazy=True)
    os.chdir("/")
    for name in PROC_MASKED:
        p = f"/proc/{name}"
        if os.path.exists(p):
            _bind("/dev/null", p)
    for name in PROC_READONLY:
        p = f"/proc/{name}"
        if os.path.isdir(p):
            _bind(p, p, k.MS_REC)
            k.make_readonly_recursive(p)


def _setup_dev(r: str, console: str) -> None:
    dev = f"{r}/dev"
    k.mount("tmpfs", dev, "tmpfs", k.MS_NOSUID | k.MS_NOEXEC, "mode=755,size=64k")
    for name in DEVICES:
        _touch(f"{dev}/{name}")
        _bind(f"/dev/{name}", f"{dev}/{name}")
    _touch(f"{dev}/console")
    _bind(console, f"{dev}/console")
    _mkdir(f"{dev}/pts")
    k.mount("devpts", f"{dev}/pts", "devpts", k.MS_NOSUID | k.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    _mkdir(f"{dev}/shm", 0o1777)
    k.mount("tmpfs", f"{dev}/shm", "tmpfs", k.MS_NOSUID | k.MS_NODEV, "mode=1777")
    _mkdir(f"{dev}/mqueue")
    for src, name in (
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ):
        os.symlink(src, f"{dev}/{name}")


def confine(net: bool, allow_syscalls: tuple[str, ...] = ()) -> None:
    """The seccomp filter every guest process carries and, for a guest in
    the host's network namespace (net), what cgroup BPF cannot do for it:
    its abstract unix sockets are the host's too (Landlock scopes them to
    the guest's processes), and sock_diag would list every socket of the
    host (the filter refuses it)."""
    if net and k.landlock_abi() >= 6:
        k.landlock_scope(k.LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET)
    prog = seccomp.build(net, frozenset(allow_syscalls))
    if prog:
        k.seccomp_filter(prog)


def default_signals() -> None:
    """Before exec into the guest: every signal at its default and none
    blocked.  An ignored disposition survives exec, and Python ignores
    SIGPIPE and SIGXFSZ, a shell started in the background SIGINT and SIGQUIT,
    nohup SIGHUP: a guest's `yes | head` or `trap ... HUP` must not inherit that."""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # the signals glibc keeps for threads
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def become_init(spec: Spec) -> None:
    """The rest of PID 1's set-up, then exec: never returns."""
    k.sethostname(spec.hostname)
    os.setsid()
    fd = os.open("/dev/console", os.O_RDWR)
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)
    for res, lim in spec.rlimits.items():
        resource.setrlimit(res, lim)
    k.drop_bounding(list(CAP_DROP.values()))
    confine(spec.net_confined, spec.allow_syscalls)
    default_signals()
    init = spec.argv[0]
    try:
        st = os.stat(init)
    except FileNotFoundError:
        raise FileNotFoundError(f"the guest has no {init}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(f"the guest's {init} is not a program")
    os.execve(init, spec.argv, spec.env)
