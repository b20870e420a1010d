"""Every namespace, mount and process syscall vctx makes, in one thin module.

The stdlib has fork, unshare (3.12+ only), setresuid and the like; what it
lacks here (unshare and setns on 3.11, pivot_root, mount_setattr, sethostname,
prctl) is bound with ctypes.  Each failure is
an OSError naming the call and its object.
"""

from __future__ import annotations

import ctypes
import os
import signal

from cowfs.sys import AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, MOUNT_ATTR_NODEV, _check, _libc, attach, clone_tree
from cowfs.sys import mount as _mount
from cowfs.sys import umount as _umount

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

SYS_pivot_root = 155
SYS_mount_setattr = 442
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

mount = _mount
umount = _umount


SYS_close_range = 436  # the same number on every architecture
CLOSE_RANGE_CLOEXEC = 1 << 2


def cloexec_from(first: int) -> None:
    """Mark every fd from first up close-on-exec (close_range(2), Linux 5.11;
    the raw syscall: glibc has a wrapper only from 2.34)."""
    ret = _syscall(SYS_close_range, ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF), ctypes.c_uint(CLOSE_RANGE_CLOEXEC))
    _check(ret, "close_range")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(SYS_pivot_root, new_root.encode(), put_old.encode()), "pivot_root", new_root)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _mount_setattr(dfd: int, path: str, flags: int, attr: _MountAttr, what: str) -> None:
    ret = _syscall(
        SYS_mount_setattr,
        ctypes.c_int(dfd),
        path.encode(),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, "mount_setattr", what)


def make_readonly_recursive(path: str) -> None:
    """mount_setattr(2): the mount at path and every mount below it read-only."""
    _mount_setattr(-100, path, AT_RECURSIVE, _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0), path)


MOUNT_ATTR_IDMAP = 0x00100000


def idmapped_bind(src: str, dst: str, userns_fd: int) -> None:
    """Bind src on dst with the ids of userns_fd's namespace (nodev): a file
    the disk says is owned by 0 is its root's.  Made detached (open_tree),
    idmapped, then attached: never visible half-made."""
    fd = clone_tree(AT_FDCWD, src, AT_SYMLINK_NOFOLLOW)
    try:
        _mount_setattr(fd, "", AT_EMPTY_PATH, _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_NODEV, 0, 0, userns_fd), src)
        attach(fd, dst)
    finally:
        os.close(fd)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname", name)


def prctl(option: int, arg: int = 0) -> None:
    _check(
        _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        "prctl",
    )


def last_cap() -> int:
    with open(CAP_LAST_CAP_FILE) as f:
        return int(f.read())


def drop_bounding(caps: list[int]) -> None:
    """Remove caps from the bounding set: no exec can ever regain them."""
    top = last_cap()
    for c in caps:
        if c <= top:
            prctl(PR_CAPBSET_DROP, c)


def rtmin(n: int = 0) -> int:
    return int(signal.SIGRTMIN) + n


# --- bpf(2), seccomp(2), landlock: the network context's kernel interfaces ---------

_ARCH = os.uname().machine
# Older syscalls are numbered per architecture; those since 5.x share one table.
SYS_bpf = {"x86_64": 321, "aarch64": 280}.get(_ARCH, -1)
SYS_seccomp = {"x86_64": 317, "aarch64": 277}.get(_ARCH, -1)
SYS_landlock_create_ruleset = 444
SYS_landlock_restrict_self = 446


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: object = None) -> int:
    """bpf(2) with a bpf_attr already laid out in attr; returns the result (an fd or 0)."""
    ret = _syscall(ctypes.c_long(SYS_bpf), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    _check(-1 if ret < 0 else 0, "bpf", what)
    return int(ret)


SECCOMP_SET_MODE_FILTER = 1


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_filter(program: bytes) -> None:
    """Install a classic-BPF seccomp filter on this thread and its future children.
    Allowed without no_new_privs for a process with CAP_SYS_ADMIN in its user
    namespace: guest root, whose setuid programs must keep working."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    ret = _syscall(
        ctypes.c_long(SYS_seccomp), ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(0), ctypes.byref(prog)
    )
    _check(-1 if ret < 0 else 0, "seccomp")


LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is off."""
    ret = _syscall(
        ctypes.c_long(SYS_landlock_create_ruleset),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(ret), 0)


def landlock_scope(scoped: int) -> None:
    """Enter a Landlock domain that restricts nothing but the given scopes."""
    attr = _LandlockRulesetAttr(0, 0, scoped)
    fd = _syscall(
        ctypes.c_long(SYS_landlock_create_ruleset),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        ctypes.c_uint(0),
    )
    _check(-1 if fd < 0 else 0, "landlock_create_ruleset")
    try:
        ret = _syscall(ctypes.c_long(SYS_landlock_restrict_self), ctypes.c_int(fd), ctypes.c_uint(0))
        _check(-1 if ret < 0 else 0, "landlock_restrict_self")
    finally:
        os.close(int(fd))
