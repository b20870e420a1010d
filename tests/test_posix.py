"""POSIX behaviour of each operation through a real cowfs mount."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Guest, as_user, cowfs, require

from cowfs.sys import fallocate

FS_IOC_GETFLAGS = 0x80086601

libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    if libc.renameat2(-100, bytes(old), -100, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_regular_files_and_nanosecond_times(guest: Guest) -> None:
    f = guest.mnt / "etc/new"
    f.write_bytes(b"abc")
    with open(f, "ab") as fh:
        fh.write(b"def")
    assert f.read_bytes() == b"abcdef"
    os.truncate(f, 2)
    assert f.read_bytes() == b"ab"
    os.utime(f, ns=(123_456_789_012, 987_654_321_098))
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (123_456_789_012, 987_654_321_098)
    assert (guest.backing / "etc/new").stat().st_mtime_ns == 987_654_321_098
    assert (guest.mnt / "etc/hostname").stat().st_mtime_ns == 2_000_000_456


def test_files_are_not_ttys(guest: Guest) -> None:
    """isatty() on a file is an ioctl the kernel always sends to the server:
    answered ENOTTY, for files and directories, and the mount carries on."""
    for p in (guest.mnt / "etc/hostname", guest.mnt / "etc"):
        fd = os.open(p, os.O_RDONLY)
        try:
            assert not os.isatty(fd)
            with pytest.raises(OSError) as e:
                fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)  # lsattr: no flags to show
            assert e.value.errno == errno.ENOTTY
        finally:
            os.close(fd)
    assert (guest.mnt / "etc/hostname").read_bytes()


def test_directories_symlinks_fifos_and_listing(guest: Guest) -> None:
    d = guest.mnt / "a/b/c"
    d.mkdir(parents=True)
    os.symlink("../../etc/hostname", guest.mnt / "a/b/link")
    os.mkfifo(guest.mnt / "a/fifo")
    assert os.readlink(guest.mnt / "a/b/link") == "../../etc/hostname"
    assert stat.S_ISFIFO((guest.mnt / "a/fifo").lstat().st_mode)
    assert sorted(os.listdir(guest.mnt / "a")) == ["b", "fifo"]
    assert sorted(os.listdir(guest.mnt)) == ["a", "bin", "etc", "usr", "var"]
    with pytest.raises(OSError) as e:
        os.rmdir(guest.mnt / "a/b")
    assert e.value.errno == errno.ENOTEMPTY
    os.rmdir(d)
    assert not d.exists()


def test_unix_socket(guest: Guest) -> None:
    import socket

    path = guest.mnt / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    assert stat.S_ISSOCK(path.lstat().st_mode)
    s.close()
    path.unlink()


def test_device_nodes_exist_but_mount_is_nodev(guest: Guest) -> None:
    os.mknod(guest.mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert stat.S_ISCHR((guest.mnt / "null").lstat().st_mode)
    with pytest.raises(PermissionError):
        os.open(guest.mnt / "null", os.O_WRONLY)


def test_permissions_are_checked_by_the_kernel(guest: Guest) -> None:
    f = guest.mnt / "etc/secret"
    f.write_text("x")
    f.chmod(0o600)
    res = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "cat", str(f)], capture_output=True
    )
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    (guest.mnt / "pub").mkdir(mode=0o777)
    os.chmod(guest.mnt / "pub", 0o1777)
    res = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "touch", str(guest.mnt / "pub/mine")]
    )
    assert res.returncode == 0
    st = (guest.mnt / "pub/mine").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert (guest.backing / "pub/mine").stat().st_uid == 1000


def test_hard_links_and_rename_flags(guest: Guest) -> None:
    a, b, c = guest.mnt / "a", guest.mnt / "b", guest.mnt / "c"
    a.write_text("A")
    os.link(a, b)
    assert a.stat().st_nlink == 2 and a.stat().st_ino == b.stat().st_ino
    c.write_text("C")
    with pytest.raises(FileExistsError):
        renameat2(a, c, 1)  # RENAME_NOREPLACE
    renameat2(a, c, 2)  # RENAME_EXCHANGE
    assert c.read_text() == "A" and a.read_text() == "C" and b.read_text() == "A"
    os.rename(c, a)
    assert a.read_text() == "A" and not c.exists()
    b.unlink()
    assert a.stat().st_nlink == 1


def test_xattrs_and_acls(guest: Guest) -> None:
    f = guest.mnt / "etc/hostname"
    assert os.getxattr(f, "user.colour") == b"blue"
    assert "trusted.cowfs.iunlink" not in os.listxattr(f)
    with pytest.raises(OSError) as e:
        os.getxattr(f, "trusted.cowfs.iunlink")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(PermissionError):
        os.setxattr(f, "trusted.cowfs.iunlink", b"")
    g = guest.mnt / "etc/acl"
    g.write_text("x")
    subprocess.run(["setfacl", "-m", "u:1234:rw", str(g)], check=True)
    out = subprocess.run(["getfacl", "-n", "-p", str(g)], capture_output=True, text=True, check=True).stdout
    assert "user:1234:rw-" in out
    res = subprocess.run(["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups", "sh", "-c", f"echo hi >> {g}"])
    assert res.returncode == 0


TRACING = Path("/sys/kernel/tracing")


def _count_getxattrs(mnt: Path, action: Callable[[], None]) -> int:
    """GETXATTR requests the kernel sends to mnt's daemon while action runs
    (the fuse_request_send trace event, for that connection only)."""
    if not (TRACING / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=False)
    event = TRACING / "events/fuse/fuse_request_send"
    require((event / "enable").exists(), "needs tracefs and the fuse trace events")
    conn = os.minor(mnt.stat().st_dev)  # the connection is the mount's anonymous device
    (TRACING / "tracing_on").write_text("0")
    (TRACING / "trace").write_text("")
    (event / "filter").write_text(f"opcode == 22 && connection == {conn}")
    (event / "enable").write_text("1")
    (TRACING / "tracing_on").write_text("1")
    try:
        action()
    finally:
        (TRACING / "tracing_on").write_text("0")
        (event / "enable").write_text("0")
        (event / "filter").write_text("0")
    return sum("fuse_request_send" in line for line in (TRACING / "trace").read_text().splitlines())


def test_the_roots_acl_is_cached_and_enforced(guest: Guest) -> None:
    """The root's ACL is asked for once, not at every path walk through it by
    a user who does not own it (the kernel makes the filesystem's own root
    before INIT and never caches its ACL: the daemon publishes an alias of
    it, daemon.publish), and a change to it takes effect at once."""
    root, etc = guest.mnt, guest.mnt / "etc"
    assert root.stat().st_uid != 1234

    def walk() -> None:
        for _ in range(50):
            os.stat(etc)
            os.stat(guest.mnt / "usr/share/doc/README")

    as_user(1234, walk)  # the first walk may fetch it
    assert _count_getxattrs(root, lambda: as_user(1234, walk)) == 0

    def refused() -> None:
        with pytest.raises(PermissionError):
            os.stat(etc)

    subprocess.run(["setfacl", "-m", "u:1234:---", str(root)], check=True)
    as_user(1234, refused)
    as_user(1235, walk)
    subprocess.run(["setfacl", "-x", "u:1234", str(root)], check=True)
    as_user(1234, walk)
    assert (
        "user:1234" not in subprocess.run(["getfacl", "-p", str(guest.backing)], capture_output=True, text=True).stdout
    )


def test_statfs_fsync_fallocate_and_long_names(guest: Guest) -> None:
    sv = os.statvfs(guest.mnt)
    host = os.statvfs(guest.backing)
    assert sv.f_blocks == host.f_blocks and sv.f_namemax == 255
    f = guest.mnt / ("n" * 255)
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"data")
    os.fsync(fd)
    os.fdatasync(fd)
    os.posix_fallocate(fd, 0, 1 << 20)
    assert os.fstat(fd).st_size == 1 << 20
    fallocate(fd, 0x01 | 0x02, 0, 1 << 20)  # FALLOC_FL_PUNCH_HOLE | KEEP_SIZE
    assert os.fstat(fd).st_size == 1 << 20 and os.pread(fd, 4, 0) == bytes(4)
    os.close(fd)
    with pytest.raises(OSError) as e:
        os.open(guest.mnt / ("n" * 256), os.O_CREAT | os.O_WRONLY)
    assert e.value.errno == errno.ENAMETOOLONG


def test_deep_paths_beyond_path_max(guest: Guest) -> None:
    """Resolve from directory fds: a tree deeper than PATH_MAX still works."""
    component = "d" * 200
    fd = os.open(guest.mnt, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(25):  # 25 * 201 > 4096
        os.mkdir(component, dir_fd=fd)
        nfd = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    leaf = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
    os.write(leaf, b"deep")
    os.close(leaf)
    assert os.stat("leaf", dir_fd=fd).st_size == 4
    os.close(fd)


def test_shared_writable_mmap(guest: Guest) -> None:
    f = guest.mnt / "usr/lib/libdemo.so"
    original = f.read_bytes()
    with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as m:
        m[0:4] = b"MMAP"
        m.flush()
    assert f.read_bytes()[:4] == b"MMAP"
    assert (guest.backing / "usr/lib/libdemo.so").read_bytes()[:4] == b"MMAP"
    assert original[:4] != b"MMAP" or original[4:] == f.read_bytes()[4:]


def test_rename_directories_keeps_children(guest: Guest) -> None:
    (guest.mnt / "x/y").mkdir(parents=True)
    (guest.mnt / "x/y/f").write_text("f")
    os.rename(guest.mnt / "x", guest.mnt / "z")
    assert (guest.mnt / "z/y/f").read_text() == "f"
    assert sorted(os.listdir(guest.mnt / "z")) == ["y"]


def test_symlinks_in_the_backing_tree_are_never_followed(mount_guest: Callable[..., Guest], tmp_path: Path) -> None:
    """Metadata calls on a guest's symlink change the link, never a host file it names."""
    outside = tmp_path / "outside"
    outside.write_text("host file")
    before = outside.stat()
    g = mount_guest()
    link = g.mnt / "escape"
    os.symlink(str(outside), link)
    os.chown(link, 1234, 1234, follow_symlinks=False)
    os.utime(link, ns=(5, 6), follow_symlinks=False)
    lst = (g.backing / "escape").lstat()
    assert (lst.st_uid, lst.st_mtime_ns) == (1234, 6)
    after = outside.stat()
    assert (after.st_uid, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_uid,
        before.st_mtime_ns,
        before.st_ctime_ns,
    )
    # ".." of the mount root is the mount's parent, never the backing tree's
    assert os.stat(g.mnt / "..").st_ino == os.stat(g.mnt.parent).st_ino


def test_reserved_names_are_refused(guest: Guest) -> None:
    with pytest.raises(PermissionError):
        (guest.mnt / ".#cowfs.mine").write_text("x")
    assert not (guest.mnt / ".#cowfs.mine").exists()


def test_id_offset_shifts_and_refuses_out_of_range(mount_guest: Callable[..., Guest]) -> None:
    g = mount_guest("shifted", "--uid-offset", "100000", "--suid")
    st = (g.mnt / "etc/passwd").stat()
    assert (st.st_uid, st.st_gid) == (100000, 100042)
    f = g.mnt / "etc/hostname"
    os.chown(f, 100007, 100008)
    assert (g.backing / "etc/hostname").stat().st_uid == 7
    with pytest.raises(OSError) as e:
        os.chown(f, 5, 5)
    assert e.value.errno == errno.EINVAL
    # host root is not in the guest's range: it cannot create files there
    with pytest.raises(OSError) as e:
        (g.mnt / "new").write_text("x")
    assert e.value.errno == errno.EOVERFLOW
    # an ACL naming a guest user is stored in backing ids
    (g.mnt / "etc/passwd").chmod(0o644)
    subprocess.run(["setfacl", "-m", "u:100033:r", str(g.mnt / "etc/passwd")], check=True)
    assert (
        "user:33:r--"
        in subprocess.run(["getfacl", "-n", "-p", str(g.backing / "etc/passwd")], capture_output=True, text=True).stdout
    )


def _in_userns(offset: int, uid: int, argv: list[str]) -> tuple[int, str]:
    """Run argv as uid in a new user namespace whose ids 0..65535 are host
    ids offset..: a guest's user, as far as the mount can tell."""
    go_r, go_w = os.pipe()
    ns_r, ns_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(out_w, 1)
            if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
                os._exit(90)
            os.write(ns_w, b"n")
            os.read(go_r, 1)  # the parent wrote the maps
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.execv(argv[0], argv)
        finally:
            os._exit(91)
    for fd in (go_r, ns_w, out_w):
        os.close(fd)
    assert os.read(ns_r, 1) == b"n"
    for f in ("uid_map", "gid_map"):
        Path(f"/proc/{pid}/{f}").write_text(f"0 {offset} 65536\n")
    os.write(go_w, b"g")
    out = b""
    while chunk := os.read(out_r, 65536):
        out += chunk
    for fd in (go_w, ns_r, out_r):
        os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out.decode()


def test_file_capabilities_belong_to_the_guests_root(
    mount_guest: Callable[..., Guest], template: Path, tmp_path: Path
) -> None:
    """A template's v2 file capability (ping's cap_net_raw) works for a
    guest's user; a guest root's setcap is stored as the template's are."""
    off = 300000
    backing = tmp_path / "caps-tree"
    cowfs("clone", str(template), str(backing))
    capcat = backing / "bin/capcat"
    shutil.copy("/usr/bin/cat", capcat)
    capcat.chmod(0o755)
    v2_net_raw = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # permitted + effective
    os.setxattr(capcat, "security.capability", v2_net_raw)
    g = mount_guest("caps", "--uid-offset", str(off), "--suid", clone=False)
    # to the host, the kernel shows it as a capability of the guest's root
    seen = os.getxattr(g.mnt / "bin/capcat", "security.capability")
    assert len(seen) == 24 and struct.unpack_from("<I", seen, 20)[0] == off
    # a guest's user runs it with the capability, in the guest's namespace
    code, out = _in_userns(off, 1000, [str(g.mnt / "bin/capcat"), "/proc/self/status"])
    assert code == 0 and "CapEff:\t0000000000002000" in out, out
    # the guest's root sets one: stored as v2, like the template's
    v2_chown = struct.pack("<5I", 0x02000001, 1 << 0, 0, 0, 0)
    script = f"import os; os.setxattr({str(g.mnt / 'bin/true')!r}, 'security.capability', {v2_chown!r})"
    code, _ = _in_userns(off, 0, ["/usr/bin/python3", "-c", script])
    assert code == 0
    assert os.getxattr(g.backing / "bin/true", "security.capability") == v2_chown
    assert "security.capability" not in os.listxattr(template / "bin/true")  # the template kept its own


def test_setid_bits_and_capabilities_are_dropped_as_the_kernel_drops_them(
    mount_guest: Callable[..., Guest], template: Path, tmp_path: Path
) -> None:
    """cowfs clears setuid/setgid and file capabilities itself (the kernel
    leaves it to the server: HANDLE_KILLPRIV_V2).  Each case runs on the
    mount and on the host's own filesystem; the results must agree.  A
    shared template file loses its bits in the guest's copy only."""
    caps = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
    shared = template / "etc/setuid-shared"
    shared.write_bytes(b"template")
    os.chown(shared, 1000, 1000)
    shared.chmod(0o6775)
    cowfs("attr", "set", "--iunlink", str(shared))
    g = mount_guest()
    native = tmp_path / "native"
    native.mkdir()

    def user_write(fd: int) -> Callable[[], None]:
        return lambda: os.pwrite(fd, b"x", 0) and None

    def user_truncate(fd: int) -> Callable[[], None]:
        return lambda: os.ftruncate(fd, 1)

    cases: list[tuple[str, int, bool, Callable[[int, Path], None]]] = [
        ("user writes", 0o6775, False, lambda fd, p: as_user(1000, user_write(fd))),
        ("user writes, setgid without group x", 0o2664, False, lambda fd, p: as_user(1000, user_write(fd))),
        ("user truncates", 0o6775, False, lambda fd, p: as_user(1000, user_truncate(fd))),
        ("root writes", 0o6775, False, lambda fd, p: os.pwrite(fd, b"x", 0) and None),
        ("root truncates", 0o6775, False, lambda fd, p: os.ftruncate(fd, 1)),
        ("root chowns", 0o6775, False, lambda fd, p: os.chown(p, 1001, 1001)),
        ("root chowns, setgid without group x", 0o2664, False, lambda fd, p: os.chown(p, 1001, 1001)),
        ("user writes a file with capabilities", 0o755, True, lambda fd, p: as_user(1000, user_write(fd))),
        ("root chowns a file with capabilities", 0o755, True, lambda fd, p: os.chown(p, 1001, 1001)),
    ]
    for i, (what, mode, with_caps, act) in enumerate(cases):
        seen = []
        for d in (g.mnt / "etc", native):
            p = d / f"case{i}"
            p.write_bytes(b"data")
            os.chown(p, 1000, 1000)
            p.chmod(mode)
            if with_caps:
                os.setxattr(p, "security.capability", caps)
            fd = os.open(p, os.O_RDWR)
            try:
                act(fd, p)
                for _ in range(2):  # a second write: the kernel may have stopped asking
                    act(fd, p)
            finally:
                os.close(fd)
            seen.append((oct(p.stat().st_mode), "security.capability" in os.listxattr(p)))
        assert seen[0] == seen[1], f"{what}: cowfs {seen[0]}, native {seen[1]}"

    fd = os.open(g.mnt / "etc/setuid-shared", os.O_RDWR)
    try:
        as_user(1000, user_write(fd))
    finally:
        os.close(fd)
    assert stat.S_IMODE((g.mnt / "etc/setuid-shared").stat().st_mode) == 0o775
    assert stat.S_IMODE(shared.stat().st_mode) == 0o6775 and shared.read_bytes() == b"template"


def test_attr_commands(template: Path) -> None:
    cowfs("attr", "clear", "--iunlink", "-R", str(template))
    out = cowfs("attr", "show", "-R", str(template)).stdout
    assert "------- " + str(template / "etc/hostname") in out and "iunlink" not in out
    assert cowfs("attr", "set", "--iunlink", "-R", str(template / "etc")).stdout == "set iunlink on 2 inodes\n"
    out = cowfs("attr", "show", str(template / "etc/hostname"), str(template / "etc/passwd")).stdout
    assert out.count("iunlink ") == 2
    cowfs("attr", "clear", "--iunlink", str(template / "etc/passwd"))
    assert cowfs("attr", "show", str(template / "etc/passwd")).stdout.startswith("-------")
    res = cowfs("attr", "set", "--iunlink", str(template / "etc"), check=False)
    assert res.returncode != 0 and "only regular files" in res.stderr
    assert "Traceback" not in res.stderr


def test_more_inodes_than_fds(mount_guest: Callable[..., Guest]) -> None:
    """With room for 16 cached inodes' fds, a guest still walks, writes and
    breaks links across hundreds: evicted inodes are reopened by handle."""
    g = mount_guest("tight", "--fd-budget", "32")
    for i in range(300):
        (g.mnt / f"f{i}").write_text(str(i))
    os.mkdir(g.mnt / "d")
    for i in range(300):
        os.rename(g.mnt / f"f{i}", g.mnt / "d" / f"f{i}")
    assert sorted(os.listdir(g.mnt / "d"), key=lambda n: int(n[1:])) == [f"f{i}" for i in range(300)]
    assert all((g.mnt / "d" / f"f{i}").read_text() == str(i) for i in range(300))
    for rel in ("etc/hostname", "etc/passwd", "usr/share/doc/README", "bin/true"):
        with open(g.mnt / rel, "ab") as f:
            f.write(b"!")
    assert (g.mnt / "usr/share/doc/README.hardlink").read_bytes().endswith(b"!")
    assert (g.mnt / "etc/hostname").read_text() == "template\n!"
