"""cowfs clone with its work shared by forked workers: the same tree as one
process makes, directory times included, and a worker's failure fails the
whole clone with nothing left behind."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import struct
from pathlib import Path

from conftest import cowfs
from test_cli import fails

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10
MARK = "trusted.cowfs.iunlink"


def big_template(root: Path) -> Path:
    """Enough directories and entries that the work is split: three levels,
    every kind of node, directory xattrs and modes, files left unmarked."""
    root.mkdir()
    for a in range(3):
        for b in range(6):
            for c in range(3):
                d = root / f"t{a}" / f"s{b}" / f"u{c}"
                d.mkdir(parents=True)
                for i in range(12):
                    (d / f"f{i}").write_bytes(f"{a}{b}{c}{i}".encode() * (i + 2))
                os.symlink(f"f{c}", d / "link")
                os.utime(d / "link", ns=(5_000_000_007, 6_000_000_009), follow_symlinks=False)
                os.mkfifo(d / "fifo")
                os.setxattr(d / "fifo", "trusted.test.kind", b"fifo")  # user.* is for files and dirs only
            s = root / f"t{a}" / f"s{b}"
            os.mknod(s / "null", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
            os.chown(s / "null", 0, 5)
            os.setxattr(s, "user.level", f"{a}{b}".encode())
            os.chown(s, 1000 + b, 2000 + a)
            s.chmod(0o750 + b % 2 * 5)
            os.utime(s, ns=(1_000_000_000 + b, 2_000_000_000 + a))
    (root / "t1" / "s2").chmod(0o555)  # read-only: filled anyway
    return root


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a clone must keep, with each regular file's inode."""
    out: dict[str, tuple[object, ...]] = {}
    for top, dirs, files in os.walk(root):
        for n in [".", *dirs, *files] if top == str(root) else [*dirs, *files]:
            p = Path(top, n)
            st = p.lstat()
            xattrs = sorted(
                (x, os.getxattr(p, x, follow_symlinks=False))
                for x in os.listxattr(p, follow_symlinks=False)
                if x != MARK
            )
            out[str(p.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                st.st_rdev,
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else "",
                st.st_ino if stat.S_ISREG(st.st_mode) else 0,
                tuple(xattrs),
            )
    return out


def test_clone_shared_by_workers_is_the_template(tmp_path: Path) -> None:
    t = big_template(tmp_path / "template")
    want = tree(t)
    for jobs in ("3", "1"):
        dest = tmp_path / f"clone-{jobs}"
        st = json.loads(cowfs("clone", "--json", "-j", jobs, str(t), str(dest)).stdout)
        assert st["workers"] == int(jobs)
        assert st["files"] == 3 * 6 * 3 * 12 and st["dirs"] == 3 + 18 + 54
        assert st["marked"] == (st["files"] if jobs == "3" else 0)  # the first clone marked them
        assert tree(dest) == want
        for p in dest.rglob("f*"):
            if p.is_file():
                assert os.getxattr(p, MARK) is not None


def _immutable(p: Path, on: bool) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    finally:
        os.close(fd)


def test_clone_worker_failure_leaves_nothing(tmp_path: Path) -> None:
    """A file link(2) refuses (chattr +i) in every worker's share: one line
    naming the call, exit 1, no partial tree, no worker left."""
    t = big_template(tmp_path / "template")
    cowfs("attr", "set", "--iunlink", "-R", str(t))
    stuck = [t / f"t{a}" / "s0" / "u0" / "f3" for a in range(3)]
    for p in stuck:
        _immutable(p, True)
    try:
        fails(1, "clone", "-j", "3", str(t), str(tmp_path / "dest"), says="Operation not permitted: ")
        res = cowfs("clone", "-j", "3", str(t), str(tmp_path / "dest"), check=False)
        assert any(f"Operation not permitted: {p}" in res.stderr for p in stuck), res.stderr
    finally:
        for p in stuck:
            _immutable(p, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["template"]
    # the workers are forks of the command: none may outlive it
    dest = str(tmp_path / "dest").encode()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        assert dest not in cmdline, proc


def test_clone_copy_is_private(tmp_path: Path) -> None:
    """clone --copy: the same tree with inodes of its own, unmarked; the
    template's hard links stay links to each other; the root says private."""
    t = big_template(tmp_path / "template")
    os.link(t / "t0" / "s0" / "u0" / "f1", t / "t2" / "s5" / "u2" / "also-f1")
    os.setxattr(t / "t1" / "s1" / "u1" / "f2", "user.note", b"kept")
    st = json.loads(cowfs("clone", "--copy", "--json", str(t), str(tmp_path / "copy")).stdout)
    assert st["copied"] and st["marked"] == 0 and st["files"] == 3 * 6 * 3 * 12 + 1
    dest = tmp_path / "copy"
    want = {k: v[:6] + v[7:] for k, v in tree(t).items()}
    got = tree(dest)
    root = got["."]
    got["."] = (*root[:7], tuple(x for x in root[7] if x[0] != "trusted.cowfs.private"))  # type: ignore[union-attr]
    assert {k: v[:6] + v[7:] for k, v in got.items()} == want  # all but the inodes
    template_inodes = {p.stat().st_ino for p in t.rglob("*") if p.is_file() and not p.is_symlink()}
    for p in dest.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert p.stat().st_ino not in template_inodes
            assert MARK not in os.listxattr(p)
    a, b = dest / "t0" / "s0" / "u0" / "f1", dest / "t2" / "s5" / "u2" / "also-f1"
    assert os.path.samestat(a.stat(), b.stat()) and a.stat().st_nlink == 2
    assert os.getxattr(dest, "trusted.cowfs.private") == b""
    fails(17, "unify", str(dest), str(tmp_path / "template"), says="private copies")
