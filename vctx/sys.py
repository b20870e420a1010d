"""Every namespace, mount and process syscall vctx makes, in one thin module.

The stdlib has fork, unshare (3.12+ only), setresuid and the like; what it
lacks here (unshare and setns on 3.11, pivot_root, mount_setattr, sethostname,
prctl) is bound with ctypes.  Each failure is
an OSError naming the call and its object.
"""

from __future__ import annotations

import ctypes
import signal

from cowfs.sys import _check, _libc
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


def make_readonly_recursive(path: str) -> None:
    """mount_setattr(2): the mount at path and every mount below it read-only."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    ret = _syscall(
        SYS_mount_setattr,
        ctypes.c_int(-100),
        path.encode(),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, "mount_setattr", path)


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
