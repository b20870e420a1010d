"""The backbone of cowfs's correctness: a Hypothesis state machine playing two
guests, mounted over clones of one template, against a plain-directory model
of each guest (a full copy, cp -a).  Every operation runs on both; results and
errors must agree, the whole visible trees must agree after every step, and
the template must stay bit- and stat-identical.
"""

from __future__ import annotations

import mmap
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from conftest import cowfs, make_template, require_root_fuse, snapshot
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

FILES = [
    "etc/hostname",
    "etc/passwd",
    "usr/share/doc/README",
    "usr/share/doc/README.hardlink",
    "usr/lib/libdemo.so",
    "bin/true",
    "new1",
    "etc/new2",
    "d1/f",
]
DIRS = ["d1", "etc/d2", "d1/sub"]
PATHS = FILES + DIRS
TARGETS = ["hostname", "missing", "f"]

paths = st.sampled_from(PATHS)
files = st.sampled_from(FILES)
guests = st.integers(0, 1)
data = st.binary(min_size=0, max_size=64)


def outcome(fn: Any, *args: Any) -> object:
    """What an operation did: its result, or the errno it failed with."""
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", e.errno)


def visible(root: Path) -> dict[str, tuple[object, ...]]:
    """A guest's tree as a process sees it (no inode numbers: those differ)."""
    out: dict[str, tuple[object, ...]] = {}
    inode_names: dict[int, list[str]] = {}
    for top, dirs, fs in os.walk(root):
        for n in sorted(dirs + fs):
            p = Path(top, n)
            rel = str(p.relative_to(root))
            s = p.lstat()
            body: object = None
            if stat.S_ISREG(s.st_mode):
                body = p.read_bytes()
                inode_names.setdefault(s.st_ino, []).append(rel)
            elif stat.S_ISLNK(s.st_mode):
                body = os.readlink(p)
            xattrs = ()
            if not stat.S_ISLNK(s.st_mode):
                xattrs = tuple(sorted((x, os.getxattr(p, x)) for x in os.listxattr(p) if x.startswith("user.")))
            out[rel] = (s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_nlink, body, xattrs)
    groups = sorted(sorted(v) for v in inode_names.values() if len(v) > 1)
    out["<hard-link groups>"] = tuple(tuple(g) for g in groups)
    return out


class TwoGuests(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cowfs-sm-"))
        self.template = make_template(self.tmp / "template")
        self.models = [self.tmp / f"model{i}" for i in range(2)]
        for model in self.models:  # full copies, taken before the template is marked
            subprocess.run(["cp", "-a", str(self.template), str(model)], check=True)
        cowfs("attr", "set", "--iunlink", "-R", str(self.template))
        self.before = snapshot(self.template)
        self.mnts: list[Path] = []
        for i in range(2):
            backing, mnt = self.tmp / f"g{i}", self.tmp / f"m{i}"
            cowfs("clone", str(self.template), str(backing))
            mnt.mkdir()
            cowfs("mount", str(backing), str(mnt))
            self.mnts.append(mnt)

    def teardown(self) -> None:
        for mnt in self.mnts:
            cowfs("umount", str(mnt), check=False)
        try:
            assert snapshot(self.template) == self.before, "the template changed"
        finally:
            shutil.rmtree(self.tmp)

    def both(self, g: int, fn: Any, *rels: str, **kw: Any) -> None:
        results = []
        for root in (self.mnts[g], self.models[g]):
            results.append(outcome(fn, *[root / r for r in rels], *kw.values()))
        assert results[0] == results[1], f"{fn.__name__}{rels}: cowfs {results[0]} vs model {results[1]}"

    # -- rules ----------------------------------------------------------

    @rule(g=guests, p=files, d=data, off=st.integers(0, 100))
    def write(self, g: int, p: str, d: bytes, off: int) -> None:
        def w(path: Path, d: bytes, off: int) -> int:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, d, off)
            finally:
                os.close(fd)

        self.both(g, w, p, d=d, off=off)

    @rule(g=guests, p=files, d=data)
    def append(self, g: int, p: str, d: bytes) -> None:
        def a(path: Path, d: bytes) -> int:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, d)
            finally:
                os.close(fd)

        self.both(g, a, p, d=d)

    @rule(g=guests, p=files, size=st.integers(0, 400_000))
    def truncate(self, g: int, p: str, size: int) -> None:
        self.both(g, os.truncate, p, size=size)

    @rule(g=guests, p=paths, mode=st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o1777]))
    def chmod(self, g: int, p: str, mode: int) -> None:
        self.both(g, os.chmod, p, mode=mode)

    @rule(g=guests, p=paths, uid=st.integers(0, 3), gid=st.integers(0, 3))
    def chown(self, g: int, p: str, uid: int, gid: int) -> None:
        self.both(g, lambda path, u, gg: os.chown(path, u, gg, follow_symlinks=False), p, uid=uid, gid=gid)

    @rule(g=guests, p=paths, t=st.integers(0, 2**40))
    def utime(self, g: int, p: str, t: int) -> None:
        self.both(g, lambda path, t: os.utime(path, ns=(t, t)), p, t=t)

    @rule(g=guests, p=paths, v=st.binary(max_size=8))
    def setxattr(self, g: int, p: str, v: bytes) -> None:
        self.both(g, lambda path, v: os.setxattr(path, "user.k", v), p, v=v)

    @rule(g=guests, p=paths)
    def removexattr(self, g: int, p: str) -> None:
        self.both(g, lambda path: os.removexattr(path, "user.k"), p)

    @rule(g=guests, src=files, dst=files)
    def link(self, g: int, src: str, dst: str) -> None:
        self.both(g, os.link, src, dst)

    @rule(g=guests, p=files)
    def unlink(self, g: int, p: str) -> None:
        self.both(g, os.unlink, p)

    @rule(g=guests, src=paths, dst=paths)
    def rename(self, g: int, src: str, dst: str) -> None:
        self.both(g, os.rename, src, dst)

    @rule(g=guests, p=st.sampled_from(DIRS))
    def mkdir(self, g: int, p: str) -> None:
        self.both(g, os.mkdir, p)

    @rule(g=guests, p=st.sampled_from(DIRS))
    def rmdir(self, g: int, p: str) -> None:
        self.both(g, os.rmdir, p)

    @rule(g=guests, p=files, to=st.sampled_from(TARGETS))
    def symlink(self, g: int, p: str, to: str) -> None:
        self.both(g, lambda path, t: os.symlink(t, path), p, t=to)

    @rule(g=guests, p=files, b=st.binary(min_size=1, max_size=4))
    def mmap_write(self, g: int, p: str, b: bytes) -> None:
        def m(path: Path, b: bytes) -> None:
            fd = os.open(path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size < len(b):
                    return
                with mmap.mmap(fd, 0) as mm:
                    mm[: len(b)] = b
                    mm.flush()
            finally:
                os.close(fd)

        self.both(g, m, p, b=b)

    @invariant()
    def guests_match_their_models(self) -> None:
        for mnt, model in zip(self.mnts, self.models, strict=True):
            assert visible(mnt) == visible(model)

    @invariant()
    def template_unchanged(self) -> None:
        assert snapshot(self.template) == self.before


def test_two_guests_against_models() -> None:
    require_root_fuse()
    examples = int(os.environ.get("COWFS_SM_EXAMPLES", "20"))
    TwoGuests.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    TwoGuests.TestCase().runTest()
