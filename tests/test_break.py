"""Link breaking: VServer's immutable-but-unlinkable semantics, done stricter."""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import signal
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Guest, cowfs, umount_stats

from cowfs.daemon import STATE_DIR, find_mount
from cowfs.sys import fallocate

MARK = "trusted.cowfs.iunlink"


def shared(g: Guest, rel: str, template: Path) -> bool:
    return (g.backing / rel).stat().st_ino == (template / rel).stat().st_ino


def chmod_(p: Path) -> None:
    p.chmod(0o640)


def chown_(p: Path) -> None:
    os.chown(p, 7, 8)


def utime_(p: Path) -> None:
    os.utime(p, ns=(1, 2))


def truncate_(p: Path) -> None:
    os.truncate(p, 3)


def setxattr_(p: Path) -> None:
    os.setxattr(p, "user.new", b"v")


def removexattr_(p: Path) -> None:
    os.removexattr(p, "user.colour")


def open_rw_(p: Path) -> None:
    os.close(os.open(p, os.O_RDWR))


def open_wronly_(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY))


def open_trunc_(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))


def append_(p: Path) -> None:
    with open(p, "a") as f:
        f.write("more\n")


def link_(p: Path) -> None:
    os.link(p, p.with_name("another-name"))


def mmap_write_(p: Path) -> None:
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[0:1] = b"X"


def fallocate_(p: Path) -> None:
    fd = os.open(p, os.O_RDWR)
    try:
        fallocate(fd, 1, 0, 1 << 16)  # FALLOC_FL_KEEP_SIZE: only a change of blocks
    finally:
        os.close(fd)


BREAKERS = [
    chmod_,
    chown_,
    utime_,
    truncate_,
    setxattr_,
    removexattr_,
    open_trunc_,
    append_,
    link_,
    mmap_write_,
    fallocate_,
]


@pytest.mark.parametrize("op", BREAKERS, ids=lambda f: f.__name__.rstrip("_"))
def test_every_change_breaks_the_link(
    mount_guest: Callable[..., Guest], template: Path, op: Callable[[Path], None]
) -> None:
    g = mount_guest()
    rel = "etc/hostname"
    ino_before = (g.mnt / rel).stat().st_ino
    assert shared(g, rel, template)
    op(g.mnt / rel)
    assert not shared(g, rel, template), "the guest's name still points at the template's inode"
    assert (g.mnt / rel).stat().st_ino == ino_before, "the guest saw its inode number change"
    copy = g.backing / rel
    assert MARK not in os.listxattr(copy)
    if op not in (removexattr_,):
        assert os.getxattr(copy, "user.colour") == b"blue"
    if op not in (chown_,):
        assert copy.stat().st_gid == 0
    assert umount_stats(g)["breaks"] == 1


def test_a_write_open_that_writes_nothing_copies_nothing(guest: Guest, template: Path) -> None:
    """The link breaks at the first change, not at the open: the kernel
    never sends opens to cowfs (it caches pages itself)."""
    open_rw_(guest.mnt / "etc/hostname")
    open_wronly_(guest.mnt / "etc/passwd")
    assert shared(guest, "etc/hostname", template) and shared(guest, "etc/passwd", template)
    fd = os.open(guest.mnt / "etc/passwd", os.O_WRONLY)
    os.write(fd, b"x")
    os.close(fd)
    assert not shared(guest, "etc/passwd", template)
    assert umount_stats(guest)["breaks"] == 1


def test_reads_exec_and_readonly_mmap_never_copy(guest: Guest, template: Path) -> None:
    assert (guest.mnt / "usr/share/doc/README").read_text().startswith("shared")
    subprocess.run([str(guest.mnt / "bin/true")], check=True)
    with open(guest.mnt / "usr/lib/libdemo.so", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:10] == (template / "usr/lib/libdemo.so").read_bytes()[:10]
    os.stat(guest.mnt / "etc/hostname")
    os.listxattr(guest.mnt / "etc/hostname")
    for rel in ("usr/share/doc/README", "bin/true", "usr/lib/libdemo.so", "etc/hostname"):
        assert shared(guest, rel, template)
    assert umount_stats(guest)["breaks"] == 0


def test_unlink_and_rename_of_marked_links_are_allowed(guest: Guest, template: Path) -> None:
    (guest.mnt / "etc/hostname").unlink()
    os.rename(guest.mnt / "etc/passwd", guest.mnt / "etc/passwd.old")
    assert not (guest.mnt / "etc/hostname").exists()
    assert (guest.mnt / "etc/passwd.old").read_text().startswith("root:")
    assert (guest.backing / "etc/passwd.old").stat().st_ino == (template / "etc/passwd").stat().st_ino
    assert (template / "etc/hostname").exists()


def test_link_counts_are_the_guests_own(mount_guest: Callable[..., Guest], template: Path) -> None:
    g1, g2 = mount_guest("one"), mount_guest("two")
    assert (template / "etc/hostname").stat().st_nlink == 3
    assert (g1.mnt / "etc/hostname").stat().st_nlink == 1
    assert (g1.mnt / "usr/share/doc/README").stat().st_nlink == 2
    assert (template / "usr/share/doc/README").stat().st_nlink == 6
    (g1.mnt / "usr/share/doc/README.hardlink").unlink()
    assert (g1.mnt / "usr/share/doc/README").stat().st_nlink == 1
    assert (g2.mnt / "usr/share/doc/README").stat().st_nlink == 2


def test_a_guests_hard_link_group_stays_one_file(mount_guest: Callable[..., Guest], template: Path) -> None:
    g1, g2 = mount_guest("one"), mount_guest("two")
    a, b = g1.mnt / "usr/share/doc/README", g1.mnt / "usr/share/doc/README.hardlink"
    with open(a, "a") as f:
        f.write("guest one's addition\n")
    assert b.read_text().endswith("guest one's addition\n")
    assert a.stat().st_ino == b.stat().st_ino and a.stat().st_nlink == 2
    assert (g1.backing / "usr/share/doc/README").stat().st_ino == (
        g1.backing / "usr/share/doc/README.hardlink"
    ).stat().st_ino
    assert not (g2.mnt / "usr/share/doc/README.hardlink").read_text().endswith("addition\n")
    assert not (template / "usr/share/doc/README").read_text().endswith("addition\n")


def test_group_names_never_looked_up_are_found(mount_guest: Callable[..., Guest], template: Path) -> None:
    """Break through one name before the kernel ever saw the other."""
    g = mount_guest()
    fd = os.open(g.mnt / "usr/share/doc/README", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"tail\n")
    os.close(fd)
    hl = g.backing / "usr/share/doc/README.hardlink"
    assert hl.stat().st_ino == (g.backing / "usr/share/doc/README").stat().st_ino
    assert hl.read_bytes().endswith(b"tail\n")


def test_open_readers_follow_the_break(guest: Guest) -> None:
    with open(guest.mnt / "etc/passwd", "rb") as reader:
        with open(guest.mnt / "etc/passwd", "r+b") as w:
            w.write(b"ROOT")
        reader.seek(0)
        assert reader.read(4) == b"ROOT"


def test_a_last_link_just_loses_its_mark(mount_guest: Callable[..., Guest], template: Path) -> None:
    g = mount_guest()
    only = g.backing / "etc/only-here"
    only.write_text("mine")
    cowfs("attr", "set", "--iunlink", str(only))
    ino = only.stat().st_ino
    cowfs("umount", str(g.mnt))
    g = mount_guest("g", clone=False)
    (g.mnt / "etc/only-here").chmod(0o600)
    assert only.stat().st_ino == ino and MARK not in os.listxattr(only)
    assert umount_stats(g) == {"breaks": 0, "unmarks": 1}


def test_the_copy_keeps_every_attribute(mount_guest: Callable[..., Guest], template: Path) -> None:
    f = template / "bin/true"
    caps = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # cap_net_bind_service+ep
    os.chown(f, 0, 5)
    os.chmod(f, 0o2755)
    subprocess.run(["setfacl", "-m", "u:4321:rx", str(f)], check=True)
    os.setxattr(f, "security.capability", caps)  # last: chown would clear it
    os.setxattr(f, "user.keep", b"me")
    os.utime(f, ns=(111_111_111_111, 222_222_222_222))
    g = mount_guest()
    os.setxattr(g.mnt / "bin/true", "user.other", b"x")  # a metadata change that breaks
    copy = g.backing / "bin/true"
    st, tst = copy.stat(), f.stat()
    assert st.st_ino != tst.st_ino
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (tst.st_mode, 0, 5, 222_222_222_222)
    assert os.getxattr(copy, "security.capability") == caps
    assert os.getxattr(copy, "user.keep") == b"me"
    assert os.getxattr(copy, "system.posix_acl_access") == os.getxattr(f, "system.posix_acl_access")
    assert copy.read_bytes() == f.read_bytes()


def test_inode_number_survives_the_kernel_forgetting(guest: Guest) -> None:
    p = guest.mnt / "etc/hostname"
    ino = p.stat().st_ino
    p.chmod(0o600)
    Path("/proc/sys/vm/drop_caches").write_text("2")  # makes the kernel forget unused inodes
    assert p.stat().st_ino == ino


def _writer(path: str, barrier: multiprocessing.synchronize.Barrier, offset: int) -> None:
    barrier.wait()
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"W", offset)
    os.close(fd)


def test_concurrent_writers_make_one_copy(guest: Guest, template: Path) -> None:
    path = str(guest.mnt / "usr/lib/libdemo.so")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(path, barrier, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert (guest.mnt / "usr/lib/libdemo.so").read_bytes()[:4] == b"WWWW"
    assert (template / "usr/lib/libdemo.so").read_bytes()[:4] != b"WWWW"
    assert umount_stats(guest)["breaks"] == 1


def _daemon_pid(g: Guest) -> int:
    entry = find_mount(str(g.mnt))
    assert entry is not None
    return int(json.loads((STATE_DIR / f"{entry.dev}.json").read_text())["pid"])


def test_killing_the_daemon_mid_break_loses_nothing(mount_guest: Callable[..., Guest], template: Path) -> None:
    big = template / "usr/lib/big.img"
    with open(big, "wb") as f:
        f.truncate(0)
        chunk = os.urandom(1 << 20)
        for _ in range(512):
            f.write(chunk)
    cowfs("attr", "set", "--iunlink", str(big))
    g = mount_guest()
    pid = _daemon_pid(g)
    writer = subprocess.Popen(["sh", "-c", f"echo x >> {g.mnt}/usr/lib/big.img"])
    # Wait until the daemon holds its anonymous copy open, then kill it.
    fd_dir = Path(f"/proc/{pid}/fd")

    def holds_a_copy() -> bool:
        for n in os.listdir(fd_dir):
            try:
                if "(deleted)" in os.readlink(fd_dir / n):
                    return True
            except FileNotFoundError:  # closed since the listing
                continue
        return False

    while not holds_a_copy():
        assert writer.poll() is None, "the break finished before the daemon could be killed"
    os.kill(pid, signal.SIGKILL)
    writer.wait()
    subprocess.run(["umount", "-l", str(g.mnt)], check=True)
    path = g.backing / "usr/lib/big.img"
    assert path.stat().st_ino == big.stat().st_ino, "the path lost its old link"
    assert not [n for n in os.listdir(path.parent) if n.startswith(".#cowfs.")]
    g.mnt.rmdir()
    g2 = mount_guest("g", clone=False)
    with open(g2.mnt / "usr/lib/big.img", "ab") as f:
        f.write(b"after")
    assert path.stat().st_ino != big.stat().st_ino and path.stat().st_size == (512 << 20) + 5


def test_leftover_temporaries_are_cleaned_at_mount(mount_guest: Callable[..., Guest]) -> None:
    g = mount_guest()
    cowfs("umount", str(g.mnt))
    (g.backing / "etc/.#cowfs.0123456789abcdef").write_text("half a break")
    g = mount_guest("g", clone=False)
    assert not (g.backing / "etc/.#cowfs.0123456789abcdef").exists()
    assert "(1 temporaries cleaned)" in g.log.read_text()


@pytest.mark.parametrize("spin_us", ["0", "10000"])
def test_breaks_finish_whether_the_daemon_spins_or_sleeps(
    mount_guest: Callable[..., Guest], template: Path, spin_us: str
) -> None:
    """A link break is finished by a worker thread while the serving thread
    waits for requests, spinning (fuse.Session.serve) or asleep in epoll:
    either way the break's answer must come, and reads between stay served."""
    g = mount_guest("g", "--spin-us", spin_us)
    lib = g.mnt / "usr/lib/libdemo.so"
    for i in range(20):
        with open(lib, "r+b") as f:  # a break on the first round, a private file after
            f.write(b"%02d" % i)
        assert (g.mnt / "etc/hostname").read_text() == "template\n"
    assert lib.read_bytes()[:2] == b"19"
    assert not shared(g, "usr/lib/libdemo.so", template)
