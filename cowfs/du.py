"""`cowfs du`: what a set of trees costs on disk, and what sharing saves.

One pass over each tree, no hashing: an inode is *private* to a tree when
all its links are names in that tree, otherwise *shared* (with other trees
of the set, a template or the unify store).  The set's disk use counts each
inode once; "full copies" counts it once per tree that holds it — the
difference is what hard links save.
"""

from __future__ import annotations

import os
import stat
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from . import errors
from .walk import open_tree, walk


@dataclass
class TreeUsage:
    path: str
    apparent: int = 0  # bytes of content (st_size), each inode once
    disk: int = 0  # allocated bytes of its inodes, as if it were alone
    private: int = 0  # allocated bytes only this tree holds
    shared: int = 0  # allocated bytes it shares with anything else
    shared_by: dict[int, int] = field(default_factory=dict)  # trees of the set holding it -> bytes
    inodes: int = 0
    files: int = 0
    dirs: int = 0
    other: int = 0  # symlinks, devices, fifos, sockets


@dataclass
class DuReport:
    trees: list[TreeUsage]
    on_disk: int  # the set, each inode once
    full_copies: int  # the set if every tree were a full private copy
    saved: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def du(paths: list[str]) -> DuReport:
    if not paths:
        raise errors.UsageError("name at least one tree")
    real = [os.path.realpath(p) for p in paths]
    if len(set(real)) != len(real):
        raise errors.UsageError("a tree is named twice")
    # ino -> blocks, nlink; per tree: ino -> names seen
    blocks: dict[int, int] = {}
    nlink: dict[int, int] = {}
    holders: dict[int, set[int]] = defaultdict(set)
    usages: list[TreeUsage] = []
    names: list[Counter[int]] = []
    for i, p in enumerate(paths):
        u = TreeUsage(p)
        seen: Counter[int] = Counter()
        root = open_tree(p)
        try:
            st0 = os.fstat(root)
            entries = [("", st0), *walk(root)]
        finally:
            os.close(root)
        for _, st in entries:
            ino = st.st_ino
            if stat.S_ISDIR(st.st_mode):
                u.dirs += 1
            elif stat.S_ISREG(st.st_mode):
                u.files += 1
            else:
                u.other += 1
            seen[ino] += 1
            if seen[ino] > 1:
                continue
            u.inodes += 1
            u.apparent += st.st_size
            b = st.st_blocks * 512
            u.disk += b
            blocks[ino] = b
            nlink[ino] = 1 if stat.S_ISDIR(st.st_mode) else st.st_nlink
            holders[ino].add(i)
        usages.append(u)
        names.append(seen)
    for u, seen in zip(usages, names, strict=True):
        for ino, n in seen.items():
            b = blocks[ino]
            if n >= nlink[ino]:
                u.private += b
            else:
                u.shared += b
                k = len(holders[ino])
                u.shared_by[k] = u.shared_by.get(k, 0) + b
    on_disk = sum(blocks.values())
    full = sum(u.disk for u in usages)
    return DuReport(usages, on_disk, full, full - on_disk)
