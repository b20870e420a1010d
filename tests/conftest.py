"""Shared fixtures: real templates, real clones, real FUSE mounts.

Every mount fixture ends with the integrity check: the template is bit-for-bit
and stat-for-stat what it was before the test touched its guests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

COWFS = [sys.executable, "-m", "cowfs"]


def require(ok: bool, reason: str) -> None:
    """Skip where the machine lacks a feature; under CI=true that is a failure."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"required feature missing under CI: {reason}")
    pytest.skip(reason)


def require_root_fuse() -> None:
    require(os.geteuid() == 0, "needs root (trusted.* xattrs, allow_other mounts)")
    require(os.path.exists("/dev/fuse"), "needs /dev/fuse")


def cowfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*COWFS, *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"cowfs {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree that a guest must never change."""
    out: dict[str, tuple[object, ...]] = {}
    for top, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(top, n)
            st = p.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            xattrs = tuple(
                sorted((x, os.getxattr(p, x, follow_symlinks=False)) for x in os.listxattr(p, follow_symlinks=False))
            )
            # Link count and ctime change whenever a guest links to or unlinks
            # a shared inode, and atime when it is read: everything else is fixed.
            out[str(p.relative_to(root))] = (
                st.st_ino,
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                digest,
                xattrs,
            )
    return out


def make_template(root: Path) -> Path:
    """A small template with every kind of node and a hard-link pair."""
    root.mkdir()
    for d in ("bin", "etc", "usr/lib", "usr/share/doc", "var/empty"):
        (root / d).mkdir(parents=True)
    (root / "etc/hostname").write_text("template\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "usr/lib/libdemo.so").write_bytes(os.urandom(300_000))
    (root / "usr/share/doc/README").write_text("shared documentation\n" * 100)
    os.link(root / "usr/share/doc/README", root / "usr/share/doc/README.hardlink")
    (root / "bin/true").write_bytes(Path("/bin/true").read_bytes())
    (root / "bin/true").chmod(0o755)
    os.symlink("../usr/lib/libdemo.so", root / "bin/lib-link")
    os.mkfifo(root / "var/fifo")
    os.setxattr(root / "etc/hostname", "user.colour", b"blue")
    os.chown(root / "etc/passwd", 0, 42)
    os.utime(root / "etc/hostname", ns=(1_000_000_123, 2_000_000_456))
    return root


@dataclass
class Guest:
    backing: Path
    mnt: Path
    log: Path


@pytest.fixture
def template(tmp_path: Path) -> Path:
    require_root_fuse()
    # Tests drop to unprivileged users: they must be able to reach the mounts.
    for p in (tmp_path, *tmp_path.parents):
        if p == Path(tempfile.gettempdir()):
            break
        p.chmod(p.stat().st_mode | 0o055)
    t = make_template(tmp_path / "template")
    cowfs("attr", "set", "--iunlink", "-R", str(t))  # as vctx builds them
    return t


@pytest.fixture
def mount_guest(tmp_path: Path, template: Path) -> Iterator[Callable[..., Guest]]:
    """Factory: clone the template into a new guest and mount it."""
    before: dict[str, tuple[object, ...]] = {}
    guests: list[Guest] = []

    def make(name: str = "g", *mount_args: str, clone: bool = True) -> Guest:
        backing, mnt, log = tmp_path / f"{name}-tree", tmp_path / f"{name}-mnt", tmp_path / f"{name}.log"
        if not before:  # as the test prepared it, before any guest
            before.update(snapshot(template))
        if clone:
            cowfs("clone", str(template), str(backing))
        mnt.mkdir(exist_ok=True)
        cowfs("mount", "--log", str(log), *mount_args, str(backing), str(mnt))
        g = Guest(backing, mnt, log)
        guests.append(g)
        return g

    yield make
    for g in guests:
        if os.path.ismount(g.mnt):
            res = cowfs("umount", str(g.mnt), check=False)
            if res.returncode != 0:
                cowfs("umount", "--lazy", str(g.mnt), check=False)
    assert not before or snapshot(template) == before, "the template changed"


@pytest.fixture
def guest(mount_guest: Callable[..., Guest]) -> Guest:
    return mount_guest()


def umount_stats(g: Guest) -> dict[str, int]:
    """Unmount and read the daemon's closing line: breaks and marks cleared."""
    cowfs("umount", str(g.mnt))
    last = [line for line in g.log.read_text().splitlines() if "stopped:" in line][-1]
    words = last.split("stopped:")[1].replace(",", "").split()
    return {"breaks": int(words[0]), "unmarks": int(words[2])}


# --- vctx ----------------------------------------------------------------------

DEBS = Path(os.environ.get("VCTX_DEB_CACHE", "/var/cache/vctx/debs"))


def vctx(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-m", "vctx", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "VCTX_HOME": str(home)},
    )
    if check and res.returncode != 0:
        raise AssertionError(f"vctx {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


def fails(home: Path, code: int, *args: str) -> str:
    res = vctx(home, *args, check=False)
    assert res.returncode == code, (args, res.returncode, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    return res.stderr


@pytest.fixture(scope="session")
def debian_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("debootstrap") is not None, "needs debootstrap")
    home = tmp_path_factory.mktemp("debian") / "home"
    # One Debian template per run, shared by the template and guest tests;
    # the .debs are cached across runs, so the mirror is needed once.
    vctx(home, "template", "build", "deb", "--from", "debian", "--suite", "bookworm", "--cache-dir", str(DEBS))
    yield home


def as_user(uid: int, action: Callable[[], None]) -> None:
    """Run action in a child that has dropped to uid (no CAP_FSETID)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            action()
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
