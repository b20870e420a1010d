"""cowfs unify, revert, store gc and du on real trees."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import COWFS, cowfs, require

MARK = "trusted.cowfs.iunlink"


@pytest.fixture(autouse=True)
def _root() -> None:
    require(os.geteuid() == 0, "needs root (trusted.* xattrs, chown)")


def make_tree(root: Path, variant: int, rng: random.Random | None = None) -> Path:
    """A guest-like tree: shared system files, a drifted one, private data,
    excluded directories, hard-link pairs, xattrs, tiny files and symlinks."""
    for d in ("usr/bin", "usr/lib/x", "usr/share/doc", "etc", "var/lib", "home/u"):
        (root / d).mkdir(parents=True, exist_ok=True)
    common = random.Random(7)
    for i in range(40):
        (root / f"usr/lib/x/lib{i}.so").write_bytes(common.randbytes(1000 + 997 * i))
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n" * 50)
    (root / "usr/bin/tool").chmod(0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")  # the guest's own hard-link pair
    (root / "usr/bin/ping").write_bytes(b"ping binary " * 40)
    if variant == 1:  # same bytes, but a capability: must not be merged with the others
        os.setxattr(
            root / "usr/bin/ping", "security.capability", bytes.fromhex("0000000200200000000000000000000000000000")
        )
    (root / "usr/share/doc/notes").write_text(f"notes of variant {variant}\n" * 10)  # differs
    (root / "usr/share/doc/tiny").write_text("tiny")  # under --min-size
    (root / "usr/share/doc/owned").write_bytes(b"owned by someone " * 9)
    os.chown(root / "usr/share/doc/owned", 1000 + variant, 1000)  # owners differ: not merged
    (root / "etc/config").write_text("same config everywhere\n" * 4)  # excluded: /etc
    (root / "var/lib/state").write_text("same state everywhere\n" * 4)  # excluded: /var
    (root / "home/u/cache.key").write_text("secret key material...\n")
    os.symlink("/etc", root / "usr/escape")  # never followed
    if rng is not None:  # files of its own, some equal to other trees' (seeded alike)
        for i in range(rng.randrange(5, 20)):
            (root / f"usr/share/doc/extra{i}").write_bytes(random.Random(i % 7).randbytes(100 + i % 7))
    for p in [root, *root.rglob("*")]:
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000), follow_symlinks=False)
    return root


def facts(root: Path, interrupted: bool = False) -> dict[str, tuple[object, ...]]:
    """What unify must never change, by path, plus each path's link group.

    interrupted: after a killed run, directories' mtimes may not be restored
    yet, reserved temporary names may be left for the next run, and link
    groups are whatever point the run reached (unify also links equal files
    inside one tree).
    """
    out: dict[str, tuple[object, ...]] = {}
    groups: dict[int, list[str]] = defaultdict(list)
    for p in sorted(root.rglob("*")):
        if interrupted and p.name.startswith(".#cowfs."):
            continue
        st = p.lstat()
        rel = str(p.relative_to(root))
        if stat.S_ISREG(st.st_mode):
            groups[st.st_ino].append(rel)
        xattrs = tuple(
            sorted(
                (x, os.getxattr(p, x, follow_symlinks=False))
                for x in os.listxattr(p, follow_symlinks=False)
                if x != MARK
            )
        )
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else (os.readlink(p) if p.is_symlink() else None)
        mtime = None if interrupted and stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, mtime, data, xattrs)
    for names in groups.values() if not interrupted else ():
        for n in names:
            out[n] += (tuple(names),)  # names sharing the inode inside this tree
    return out


def trees(tmp_path: Path, n: int = 3) -> list[Path]:
    return [make_tree(tmp_path / f"g{i}", i) for i in range(n)]


def ino(p: Path) -> int:
    return p.lstat().st_ino


def marked(p: Path) -> bool:
    return MARK in os.listxattr(p, follow_symlinks=False)


def test_unify_links_equal_files_and_keeps_everything_else(tmp_path: Path) -> None:
    ts = trees(tmp_path)
    before = [facts(t) for t in ts]
    out = json.loads(cowfs("unify", "--json", *map(str, ts)).stdout)
    assert [facts(t) for t in ts] == before

    lib = [ino(t / "usr/lib/x/lib3.so") for t in ts]
    assert len(set(lib)) == 1 and marked(ts[0] / "usr/lib/x/lib3.so")
    tool = [ino(t / "usr/bin/tool") for t in ts]
    assert len(set(tool)) == 1 and all(ino(t / "usr/bin/tool-alias") == tool[0] for t in ts)
    # ping: g0 and g2 equal, g1 carries a capability
    assert ino(ts[0] / "usr/bin/ping") == ino(ts[2] / "usr/bin/ping") != ino(ts[1] / "usr/bin/ping")
    for rel in ("usr/share/doc/notes", "usr/share/doc/owned", "usr/share/doc/tiny", "etc/config", "var/lib/state"):
        assert len({ino(t / rel) for t in ts}) == 3, rel
    assert not marked(ts[0] / "etc/config")
    store = tmp_path / ".cowfs-store"
    assert ino(ts[0] / "usr/lib/x/lib3.so") in {p.lstat().st_ino for p in store.rglob("*") if p.is_file()}
    assert out["linked"] == 2 * 40 + 2 * 2 + 1  # libs, tool (two names each), ping
    assert out["bytes_saved"] > 2 * sum(1000 + 997 * i for i in range(40))

    again = json.loads(cowfs("unify", "--json", *map(str, ts)).stdout)
    assert again["linked"] == 0
    # only look-alikes are hashed again: the capped ping and the three notes
    assert again["candidates"] == 4


def test_unify_options(tmp_path: Path) -> None:
    ts = trees(tmp_path, 2)
    os.utime(ts[1] / "usr/lib/x/lib0.so", ns=(1, 2))
    cowfs("unify", "--dry-run", *map(str, ts))
    assert ino(ts[0] / "usr/lib/x/lib1.so") != ino(ts[1] / "usr/lib/x/lib1.so")
    assert not (tmp_path / ".cowfs-store").exists()

    store = tmp_path / "st"
    cowfs("unify", "--store", str(store), "--exclude", "/usr/lib/x/lib1*", "--exclude", "tool*", *map(str, ts))
    assert ino(ts[0] / "usr/lib/x/lib1.so") != ino(ts[1] / "usr/lib/x/lib1.so")  # excluded
    assert ino(ts[0] / "usr/lib/x/lib10.so") != ino(ts[1] / "usr/lib/x/lib10.so")  # the pattern matches it too
    assert ino(ts[0] / "usr/bin/tool") != ino(ts[1] / "usr/bin/tool")
    assert ino(ts[0] / "usr/lib/x/lib0.so") != ino(ts[1] / "usr/lib/x/lib0.so")  # mtime differs
    assert ino(ts[0] / "usr/lib/x/lib2.so") == ino(ts[1] / "usr/lib/x/lib2.so")

    cowfs("unify", "--store", str(store), "--ignore-mtime", "--no-default-excludes", "--min-size", "1", *map(str, ts))
    assert ino(ts[0] / "usr/lib/x/lib0.so") == ino(ts[1] / "usr/lib/x/lib0.so")
    assert ino(ts[0] / "etc/config") == ino(ts[1] / "etc/config")
    assert ino(ts[0] / "usr/share/doc/tiny") == ino(ts[1] / "usr/share/doc/tiny")


def test_conffiles_are_excluded(tmp_path: Path) -> None:
    ts = trees(tmp_path, 2)
    for t in ts:
        (t / "var/lib/dpkg/info").mkdir(parents=True)
        (t / "var/lib/dpkg/info/tool.conffiles").write_text("/usr/bin/tool\n")
    cowfs("unify", *map(str, ts))
    assert ino(ts[0] / "usr/bin/tool") != ino(ts[1] / "usr/bin/tool")
    assert ino(ts[0] / "usr/lib/x/lib5.so") == ino(ts[1] / "usr/lib/x/lib5.so")


def test_revert_gives_private_copies_and_gc_empties_the_store(tmp_path: Path) -> None:
    ts = trees(tmp_path)
    before = [facts(t) for t in ts]
    cowfs("unify", *map(str, ts))
    cowfs("unify", "--revert", str(ts[0]))
    assert [facts(t) for t in ts] == before
    others = {p.lstat().st_ino for t in ts[1:] for p in t.rglob("*")}
    for p in ts[0].rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert p.lstat().st_ino not in others and not marked(p), p
    assert ino(ts[0] / "usr/bin/tool") == ino(ts[0] / "usr/bin/tool-alias")  # still one file

    store = tmp_path / ".cowfs-store"
    cowfs("unify", "--revert", *map(str, ts[1:]))
    assert [facts(t) for t in ts] == before
    assert not [p for p in store.rglob("*") if p.is_file()]  # gc ran


def test_store_gc_keeps_what_is_linked(tmp_path: Path) -> None:
    ts = trees(tmp_path, 2)
    cowfs("unify", *map(str, ts))
    store = tmp_path / ".cowfs-store"
    entries = [p for p in store.rglob("*") if p.is_file()]
    (ts[0] / "usr/lib/x/lib7.so").unlink()
    (ts[1] / "usr/lib/x/lib7.so").unlink()
    res = cowfs("store", "gc", str(store))
    assert res.stdout.strip() == "removed 1 unused entry"
    left = [p for p in store.rglob("*") if p.is_file()]
    assert len(left) == len(entries) - 1 and all(p.lstat().st_nlink > 1 for p in left)


def test_killed_at_any_moment_unify_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL unify at random moments: every name stays whole; a rerun finishes."""
    rng = random.Random(1)
    n = 6

    def fresh(tag: str) -> list[Path]:
        return [make_tree(tmp_path / tag / f"g{i}", i, random.Random(i)) for i in range(n)]

    reference = fresh("ref")
    expected = [facts(t, interrupted=True) for t in reference]
    t0 = time.monotonic()
    cowfs("unify", *map(str, reference))
    full = time.monotonic() - t0
    linked_ref = [facts(t, interrupted=True) for t in reference]
    inos_ref = [len({p.lstat().st_ino for p in t.rglob("*")}) for t in reference]

    for round_ in range(5):
        ts = fresh(f"r{round_}")
        proc = subprocess.Popen([*COWFS, "unify", *map(str, ts)], stdout=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0, full))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        # whatever the moment: every file whole, with its metadata
        assert [facts(t, interrupted=True) for t in ts] == expected
        cowfs("unify", *map(str, ts))
        assert [facts(t, interrupted=True) for t in ts] == linked_ref
        assert not list((tmp_path / f"r{round_}").rglob(".#cowfs.*"))
        assert [len({p.lstat().st_ino for p in t.rglob("*")}) for t in ts] == inos_ref


def test_du_arithmetic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "private").write_bytes(os.urandom(40_000))
    (a / "shared").write_bytes(os.urandom(100_000))
    os.link(a / "shared", b / "shared")
    os.link(a / "private", a / "private2")  # its own pair: still private
    (tmp_path / "outside").write_bytes(os.urandom(8_000))
    os.link(tmp_path / "outside", b / "from-template")  # shared with something outside the set
    os.symlink("private", a / "link")

    def blocks(p: Path) -> int:
        return p.lstat().st_blocks * 512

    rep = json.loads(cowfs("du", "--json", str(a), str(b)).stdout)
    ua, ub = rep["trees"]
    assert ua["private"] == blocks(a / "private") + blocks(a) + blocks(a / "link")
    assert ua["shared"] == blocks(a / "shared")
    assert ua["shared_by"] == {"2": blocks(a / "shared")}
    assert ua["files"] == 3 and ua["inodes"] == 4 and ua["other"] == 1
    assert ub["shared"] == blocks(b / "shared") + blocks(b / "from-template")
    assert ub["shared_by"] == {"2": blocks(b / "shared"), "1": blocks(b / "from-template")}
    assert ua["apparent"] == 40_000 + 100_000 + a.lstat().st_size + len("private")
    assert rep["full_copies"] == ua["disk"] + ub["disk"]
    assert rep["saved"] == blocks(a / "shared")
    assert rep["on_disk"] == rep["full_copies"] - rep["saved"]
    text = cowfs("du", str(a), str(b)).stdout
    assert "saved" in text and str(a) in text


def test_bad_input(tmp_path: Path, mount_guest) -> None:  # type: ignore[no-untyped-def]
    ts = trees(tmp_path, 2)

    def fails(code: int, *args: str) -> str:
        res = cowfs(*args, check=False)
        assert res.returncode == code, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        return res.stderr

    assert "does not exist" in fails(17, "unify", str(tmp_path / "nope"))
    assert "does not exist" in fails(17, "du", str(tmp_path / "nope"))
    assert "same tree" in fails(2, "unify", str(ts[0]), str(ts[0]) + "/")
    assert "inside" in fails(2, "unify", str(ts[0]), str(ts[0] / "usr"))
    assert "overlap" in fails(2, "unify", "--store", str(ts[0] / "store"), str(ts[0]))
    require(os.path.ismount("/dev/shm"), "needs a second filesystem (/dev/shm)")
    assert "another filesystem" in fails(17, "unify", "--store", "/dev/shm/cowfs-test-store", str(ts[0]))
    assert "does not exist" in fails(17, "store", "gc", str(tmp_path / "nope"))
    g = mount_guest()
    assert "served by the cowfs mount" in fails(14, "unify", str(g.backing), str(ts[0]))
    assert "served by the cowfs mount" in fails(14, "unify", "--revert", str(g.backing))
