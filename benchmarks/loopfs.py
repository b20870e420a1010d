"""A fresh ext4 file system on a loop device, for the benchmarks' trees.

Why not the host's own: ext4 without a journal (this machine's root, and
many cloud images') skips, one by one, every inode freed in the last minute
or five when it allocates one, reading each's on-disk dtime.  Whichever
contender creates files where an earlier step deleted some then pays up to
0.7 ms a file (20 us elsewhere on the same disk), and the benchmark measures
where its trees happened to land.  mkfs.ext4's defaults (a journal) make
allocation the same for every contender, as on a typical host.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cowfs.sys import mount as sys_mount
from cowfs.sys import umount as sys_umount

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8: attach and configure in one call
LO_FLAGS_AUTOCLEAR = 4  # the device detaches itself when its last user (the mount) goes
# struct loop_info64: five u64, four u32, file name, crypt name, key, two u64 (232 bytes)
LOOP_INFO64 = struct.Struct("<5Q4I64s64s32s2Q")


def _attach(image: Path) -> tuple[str, int]:
    """A free loop device backed by image: its path, and an open fd on it,
    to close once the mount holds the device (with AUTOCLEAR, the last
    close before that would detach it again)."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    img = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):  # another process may take the free device first
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{n}"
            loop = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            info = LOOP_INFO64.pack(
                0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, image.name.encode()[:63], b"", b"", 0, 0
            )
            try:
                fcntl.ioctl(loop, LOOP_CONFIGURE, struct.pack("<II", img, 0) + info + bytes(64))
            except OSError as e:
                os.close(loop)
                if e.errno == errno.EBUSY:  # taken meanwhile
                    continue
                raise
            return dev, loop
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(img)
        os.close(ctl)


@contextmanager
def fresh_ext4(image: Path, mountpoint: Path, size_gib: int) -> Iterator[Path]:
    """mountpoint, with a new ext4 (sparse image file) mounted on it."""
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_gib << 30)
    # No syscall makes a file system: mke2fs it is (e2fsprogs, always installed).
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        dev, loop = _attach(image)
        try:
            sys_mount(dev, str(mountpoint), "ext4", 0, "")
        finally:
            os.close(loop)
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    try:
        yield mountpoint
    finally:
        sys_umount(str(mountpoint), lazy=True)
        image.unlink(missing_ok=True)
