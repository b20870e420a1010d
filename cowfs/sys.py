"""Every privileged or non-stdlib syscall cowfs makes, in one thin module.

The stdlib is used where it has the call (fcntl.ioctl: FICLONE and FUSE
passthrough's backing files).  What it lacks (renameat2, linkat with
AT_EMPTY_PATH, fchownat/utimensat on O_PATH descriptors, fallocate modes,
mount and umount2) is bound here with ctypes, each function small and
typed, each failure an OSError that names the call and the object it was
applied to.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import struct

# The process's own symbols: libc is loaded already (find_library would run
# ldconfig in a subprocess, milliseconds of every command's start-up).
_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
FICLONE = 0x40049409
# <linux/fuse.h>: _IOR(229, 0, uint32_t), _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t)
FUSE_DEV_IOC_CLONE = 0x8004E500
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502
MNT_DETACH = 2
FALLOC_FL_KEEP_SIZE = 1
UTIME_OMIT = (1 << 30) - 2
O_TMPFILE = os.O_TMPFILE if hasattr(os, "O_TMPFILE") else 0o20200000

# O_PATH opens that never follow a symlink: the daemon is host root walking a
# tree its guest controls, so every component is opened this way.
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int

_linkat = _libc.linkat
_linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_linkat.restype = ctypes.c_int

_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_fchownat.restype = ctypes.c_int

_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_utimensat.restype = ctypes.c_int

_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int

_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_mount.restype = ctypes.c_int

MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(_FileHandle),
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_name_to_handle_at.restype = ctypes.c_int

_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
SYS_openat2 = 437  # the same number on every architecture
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# Resolving a path inside a guest's tree: no symlink anywhere on the way, no
# "..", no other mount — the kernel enforces it in one call.
RESOLVE_IN_TREE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int


def _check(ret: int, call: str, what: object = None) -> None:
    """Turn a libc failure into an OSError naming the call and its object."""
    if ret == -1:
        err = ctypes.get_errno()
        hint = ""
        if err == errno.ENOSYS:
            hint = " (kernel too old or blocked by seccomp)"
        raise OSError(err, f"{call}: {os.strerror(err)}{hint}", None if what is None else str(what))


def proc_fd(fd: int) -> str:
    """The magic link for fd: path calls on it jump straight to the inode."""
    return f"/proc/self/fd/{fd}"


def open_beneath(dir_fd: int, path: str | bytes, flags: int, mode: int = 0) -> int:
    """openat2(2) with RESOLVE_IN_TREE: path stays below dir_fd, symlinks refused (ELOOP)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_IN_TREE)
    raw = os.fsencode(path)
    fd = _syscall(SYS_openat2, ctypes.c_int(dir_fd), ctypes.c_char_p(raw), ctypes.byref(how), ctypes.c_size_t(24))
    _check(fd, "openat2", path)
    return int(fd)


def linkat(olddir: int, old: bytes | str, newdir: int, new: bytes | str) -> None:
    """link(2) by names relative to directory fds; never follows a symlink."""
    _check(_linkat(olddir, os.fsencode(old), newdir, os.fsencode(new), 0), "linkat", old)


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int = 0) -> None:
    _check(_renameat2(olddir, old, newdir, new, flags), "renameat2", old)


def link_fd(fd: int, newdir: int, new: bytes) -> None:
    """Give the inode behind fd (an O_TMPFILE or O_PATH fd) the name new."""
    _check(_linkat(fd, b"", newdir, new, AT_EMPTY_PATH), "linkat", new)


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(AT_EMPTY_PATH): works on O_PATH fds, symlinks included.

    -1 leaves an id unchanged, as chown(2) does.
    """
    _check(_fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH), "fchownat", fd)


def utimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """utimensat(AT_EMPTY_PATH) with nanosecond times; None leaves a time alone."""
    ts = (_Timespec * 2)()
    for i, t in enumerate((atime_ns, mtime_ns)):
        if t is None:
            ts[i].tv_sec, ts[i].tv_nsec = 0, UTIME_OMIT
        else:
            ts[i].tv_sec, ts[i].tv_nsec = divmod(t, 1_000_000_000)
    _check(_utimensat(fd, b"", ts, AT_EMPTY_PATH), "utimensat", fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_fallocate(fd, mode, offset, length), "fallocate", fd)


def ficlone(dst_fd: int, src_fd: int) -> bool:
    """Reflink src into dst; False where the filesystem cannot share extents."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


def fuse_clone(fuse_fd: int) -> int:
    """A second fd on fuse_fd's connection, with its own open file (so its
    own O_NONBLOCK): it reads from the same queue of requests, and a reply
    must go to the fd its request was read from."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("<I", fuse_fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def backing_open(fuse_fd: int, fd: int) -> int:
    """Register fd's open file as a backing file of the FUSE connection;
    its id goes in an OPEN reply with FOPEN_PASSTHROUGH.  The kernel takes
    its own reference: fd may be closed afterwards.  Needs CAP_SYS_ADMIN."""
    arg = bytearray(struct.pack("<iIQ", fd, 0, 0))  # struct fuse_backing_map: fd, flags, padding
    # A mutable buffer makes fcntl.ioctl return the call's result: the id.
    backing_id: int = fcntl.ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_OPEN, arg, True)
    return backing_id


def backing_close(fuse_fd: int, backing_id: int) -> None:
    fcntl.ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_CLOSE, struct.pack("<I", backing_id))


def copy_data(dst_fd: int, src_fd: int, size: int) -> None:
    """Copy size bytes: reflink where possible, else in-kernel copy_file_range."""
    if size == 0 or ficlone(dst_fd, src_fd):
        return
    try:
        # Blocks allocated in one go, not page by page as the copy lands:
        # 100 MiB on ext4 in 28 ms instead of 36.  ENOSPC shows here, before any copying.
        # fallocate(2) itself: glibc's posix_fallocate writes zeros where it is missing.
        fallocate(dst_fd, FALLOC_FL_KEEP_SIZE, 0, size)  # the copy sets the size
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    off = 0
    while off < size:
        n = os.copy_file_range(src_fd, dst_fd, min(size - off, 1 << 30), off, off)
        if n == 0:  # the source shrank under us; what we copied is what there is
            break
        off += n


def name_to_handle(dir_fd: int, name: bytes) -> bytes | None:
    """The file handle of dir_fd/name (not following a symlink): the handle
    type, then its bytes.  None where the filesystem cannot export handles."""
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    flags = AT_EMPTY_PATH if name == b"" else 0
    if _name_to_handle_at(dir_fd, name, ctypes.byref(fh), ctypes.byref(mount_id), flags) == -1:
        if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        _check(-1, "name_to_handle_at", name)
    return int(fh.handle_type).to_bytes(4, "little", signed=True) + bytes(fh.f_handle[: fh.handle_bytes])


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open an inode by its handle (needs CAP_DAC_READ_SEARCH)."""
    fh = _FileHandle()
    fh.handle_type = int.from_bytes(handle[:4], "little", signed=True)
    data = handle[4:]
    fh.handle_bytes = len(data)
    ctypes.memmove(fh.f_handle, data, len(data))
    fd = _open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    _check(fd, "open_by_handle_at", "file handle")
    return int(fd)


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _mount(
            source.encode(),
            target.encode(),
            None if fstype is None else fstype.encode(),
            flags,
            None if data is None else ctypes.c_char_p(data.encode()),
        ),
        "mount",
        target,
    )


def umount(target: str, lazy: bool = False) -> None:
    _check(_umount2(target.encode(), MNT_DETACH if lazy else 0), "umount2", target)


# The mount API of Linux 5.2+: the same numbers on every architecture.
SYS_open_tree, SYS_move_mount, SYS_fsopen, SYS_fsconfig, SYS_fsmount = 428, 429, 430, 431, 432
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x2, 0x4
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 4


def fsmount(fstype: str, strings: dict[str, str], flags: list[str], attrs: int) -> int:
    """A new filesystem as a detached mount (fsopen, fsconfig, fsmount): an
    fd no path reaches until it is attached.  strings and flags are its
    mount options."""
    fs = _syscall(SYS_fsopen, fstype.encode(), ctypes.c_uint(1))  # FSOPEN_CLOEXEC
    _check(-1 if fs < 0 else 0, "fsopen", fstype)
    try:
        for key, value in strings.items():
            ret = _syscall(SYS_fsconfig, ctypes.c_int(fs), FSCONFIG_SET_STRING, key.encode(), value.encode(), 0)
            _check(ret, "fsconfig", key)
        for key in flags:
            _check(_syscall(SYS_fsconfig, ctypes.c_int(fs), FSCONFIG_SET_FLAG, key.encode(), None, 0), "fsconfig", key)
        _check(_syscall(SYS_fsconfig, ctypes.c_int(fs), FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig", fstype)
        mnt = _syscall(SYS_fsmount, ctypes.c_int(fs), ctypes.c_uint(1), ctypes.c_uint(attrs))  # FSMOUNT_CLOEXEC
        _check(-1 if mnt < 0 else 0, "fsmount", fstype)
        return int(mnt)
    finally:
        os.close(fs)


def clone_tree(dir_fd: int, path: str, flags: int = 0) -> int:
    """open_tree(OPEN_TREE_CLONE): a detached bind mount of path below dir_fd."""
    how = ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | flags)
    fd = _syscall(SYS_open_tree, ctypes.c_int(dir_fd), path.encode(), how)
    _check(-1 if fd < 0 else 0, "open_tree", path)
    return int(fd)


def attach(mnt_fd: int, target: str) -> None:
    """move_mount(2): the detached mount mnt_fd, attached at target."""
    ret = _syscall(
        SYS_move_mount, ctypes.c_int(mnt_fd), b"", AT_FDCWD, target.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)
    )
    _check(ret, "move_mount", target)


def raise_nofile_limit() -> int:
    """Lift RLIMIT_NOFILE to the hard maximum: the daemon holds an O_PATH fd
    for every inode the kernel knows, like libfuse's passthrough_ll."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = max(hard, int(f.read()))
        except OSError:
            pass
    for want in (hard, soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError):
            continue
    return soft


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): sig when the parent thread exits."""
    _check(
        _libc.prctl(
            ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        ),
        "prctl(PR_SET_PDEATHSIG)",
    )
