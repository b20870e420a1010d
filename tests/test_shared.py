"""One page cache for shared files (cowfs/shared.py): FUSE passthrough."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Guest, as_user, require, umount_stats

LIB = "usr/lib/libdemo.so"  # 300,000 bytes: above the 32 KiB threshold

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p


def resident_pages(path: Path) -> int:
    """Pages of path's inode in the page cache (mmap + mincore, as fincore(1))."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, ctypes.c_size_t(size), mmap.PROT_READ, mmap.MAP_SHARED, fd, ctypes.c_long(0))
    finally:
        os.close(fd)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        assert _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec)
    finally:
        _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))


def require_passthrough(g: Guest, wanted: str = "shared") -> None:
    """The daemon logs what INIT settled, before its reply: after the first
    request the line is there."""
    os.stat(g.mnt)
    require(f"page cache: {wanted}" in g.log.read_text(), "the kernel has no FUSE passthrough (Linux 6.9+)")


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert resident_pages(path) == 0


@pytest.mark.parametrize("mode", ["--shared-cache", "--private-cache"])
def test_shared_files_are_read_through_the_shared_inodes_pages(
    mount_guest: Callable[..., Guest], template: Path, mode: str
) -> None:
    """Shared: every read of a mount goes to the template inode's pages, so
    pages evicted there come back at the next read.  Private: the mount
    serves its second read from its own copy and the template's stay out."""
    g = mount_guest("g", mode)
    require_passthrough(g, "shared" if mode == "--shared-cache" else "private")
    want = (template / LIB).read_bytes()
    assert (g.mnt / LIB).read_bytes() == want
    evict(template / LIB)
    assert (g.mnt / LIB).read_bytes() == want
    pages = (len(want) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if mode == "--shared-cache":
        assert resident_pages(template / LIB) == pages
    else:
        assert resident_pages(template / LIB) == 0
    # mmap, as the dynamic linker maps a library, reads the same bytes
    with open(g.mnt / LIB, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == want
    assert umount_stats(g) == {"breaks": 0, "unmarks": 0}


def test_a_shared_file_open_for_reading_cannot_change_under_its_readers(
    mount_guest: Callable[..., Guest], template: Path
) -> None:
    """A passthrough reader reads the template's inode, which cannot follow
    a link break: while one is open, writing or truncating the file is
    refused (ETXTBSY, as for a running program).  Metadata changes break the
    link as ever, and further readers share the first one's view.  Once the
    readers are gone, the write breaks the link."""
    g = mount_guest()
    lib = g.mnt / LIB
    want = (template / LIB).read_bytes()
    require_passthrough(g)
    with open(lib, "rb") as reader:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(lib, flags)
            assert e.value.errno == errno.ETXTBSY
        with pytest.raises(OSError) as e:
            os.truncate(lib, 10)
        assert e.value.errno == errno.ETXTBSY
        lib.chmod(0o600)  # breaks the link: a private copy, same content
        assert (g.backing / LIB).stat().st_ino != (template / LIB).stat().st_ino
        assert lib.read_bytes() == want  # another reader, sharing the first one's backing
        assert reader.read() == want
    with open(lib, "r+b") as w:
        w.write(b"mine")
    assert lib.read_bytes() == b"mine" + want[4:]
    assert (template / LIB).read_bytes() == want
    assert oct(lib.stat().st_mode & 0o777) == oct(0o600)
    assert umount_stats(g) == {"breaks": 1, "unmarks": 0}


def test_a_shared_file_open_for_writing_is_not_read_through_the_template(
    mount_guest: Callable[..., Guest], template: Path
) -> None:
    """Open for writing first: readers then use the mount's own cache and see
    the writes, which break the link."""
    g = mount_guest()
    lib = g.mnt / LIB
    with open(lib, "r+b") as w, open(lib, "rb") as reader:
        w.write(b"mine")
        w.flush()
        assert reader.read(4) == b"mine"
    assert (template / LIB).read_bytes()[:4] != b"mine"
    assert umount_stats(g) == {"breaks": 1, "unmarks": 0}


@pytest.mark.parametrize("mode", ["--shared-cache", "--private-cache"])
def test_private_files_are_read_and_written_by_the_kernel_itself(mount_guest: Callable[..., Guest], mode: str) -> None:
    """Shared mode: a private file's opens are passthrough to it, so a read
    after its pages were evicted brings them back into the backing file's
    cache (private mode: the mount serves the read from its own copy).
    Readers, writers, mmap and truncate all see one file."""
    g = mount_guest("g", mode)
    require_passthrough(g, "shared" if mode == "--shared-cache" else "private")
    f, backing = g.mnt / "own", g.backing / "own"
    data = os.urandom(256 * 1024)
    f.write_bytes(data)
    assert backing.read_bytes() == data
    evict(backing)
    assert f.read_bytes() == data
    pages = len(data) // mmap.PAGESIZE
    assert resident_pages(backing) == (pages if mode == "--shared-cache" else 0)
    with open(f, "r+b", buffering=0) as w, open(f, "rb", buffering=0) as r:
        w.write(b"one")
        assert os.pread(r.fileno(), 3, 0) == b"one"
        with mmap.mmap(w.fileno(), 0) as m:
            m[3:6] = b"two"
            m.flush()
        assert os.pread(r.fileno(), 6, 0) == b"onetwo"
        os.truncate(f, 6)  # no reader holds a private file back
        assert r.read() == b"onetwo"
    assert backing.read_bytes() == f.read_bytes() == b"onetwo"
    assert f.stat().st_size == 6
    assert umount_stats(g) == {"breaks": 0, "unmarks": 0}


def test_a_setuid_file_is_never_written_passthrough(mount_guest: Callable[..., Guest]) -> None:
    """The kernel writes passthrough as the daemon (root), and root's writes
    keep setuid bits that anyone else's clear: such a file is opened
    cached, and an open for writing that would join its passthrough
    readers (it became setuid while they read) is refused."""
    g = mount_guest()
    require_passthrough(g)
    f = g.mnt / "tool"
    f.write_bytes(b"#!/bin/sh\n")
    f.chmod(0o755)
    with open(f, "rb"):
        f.chmod(0o4755)
        with pytest.raises(OSError) as e:
            os.open(f, os.O_WRONLY)
        assert e.value.errno == errno.ETXTBSY
    # no reader now: cached, and a write by someone who is not root clears the bit
    fd = os.open(f, os.O_RDWR)
    try:
        as_user(1000, lambda: os.pwrite(fd, b"true\n", 10) and None)
    finally:
        os.close(fd)
    assert f.read_bytes() == b"#!/bin/sh\ntrue\n"
    assert f.stat().st_mode & 0o7777 == 0o755
