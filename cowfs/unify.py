"""`cowfs unify`: fold identical files of many trees into one shared inode.

VServer's vhashify, done so that a crash can never lose a file:

1. Walk every tree (and the store) once, without following symlinks, and
   group regular files by what must match before content is even read:
   size, mode, owner, group and (unless ignored) mtime.  Only groups that
   hold more than one inode are hashed — clones of one template share their
   inodes already and cost nothing.
2. Hash those inodes in parallel with BLAKE3: the fastest cryptographic hash
   there is on one core (SIMD) and it releases the GIL on long inputs, so a
   thread pool keeps every core busy.  Being cryptographic, equal digests
   mean equal content; no byte-by-byte recheck is needed.  xattrs (ACLs,
   file capabilities, SELinux labels) are part of the key too: a `ping`
   with cap_net_raw is not the same file as one without.
3. For each key with more than one inode, keep one inode in the
   content-addressed store (a hard link named by digest, on the same
   filesystem), mark it immutable-but-unlinkable, and replace every other
   name by a link to it: link to a reserved temporary name, then rename(2)
   over the original — the name never goes missing, and a name is replaced
   only if it still is the inode that was hashed.

Killed at any point, a tree holds old inodes or linked ones, never a missing
or partial file; leftovers are temporary names (removed by the next run or
mount) and store entries nobody links to (removed by `store gc`).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import secrets
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from . import breaking, errors, mark
from .daemon import serving
from .sys import O_PATH_NOFOLLOW, linkat, open_beneath, proc_fd, renameat2
from .walk import DirCache, dir_times, open_tree, restore_times, split, walk

MIN_SIZE = 16
# Like vhashify: what a guest's admin edits or what must stay secret.
DEFAULT_EXCLUDES = ("/etc", "/var", "/home", "/tmp", "/root", "/run", "*.key", "*.pem", "ssh_host_*")
STORE_NAME = ".cowfs-store"
_CHUNK = 1 << 20
_BATCH_BYTES = 8 << 20
_MMAP_BYTES = 4 << 20
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME

# (size, mode, uid, gid, mtime_ns or None)
PreKey = tuple[int, int, int, int, int | None]
Progress = Callable[[str, int, int], None]  # phase, done, total


@dataclass
class UnifyStats:
    trees: int = 0
    files: int = 0  # regular files examined (after exclusions)
    excluded: int = 0
    candidates: int = 0  # inodes that had to be hashed
    hashed_bytes: int = 0
    hash_seconds: float = 0.0
    groups: int = 0  # distinct contents linked
    linked: int = 0  # names replaced by a link
    inodes_freed: int = 0
    bytes_saved: int = 0
    changed: int = 0  # names that changed under us and were left alone
    temps_removed: int = 0
    store_added: int = 0
    gc_removed: int = 0
    seconds: float = 0.0


@dataclass
class _Inode:
    st: os.stat_result
    names: list[tuple[int, str]] = field(default_factory=list)  # (tree index, relative path)
    store: str | None = None  # its store name, if it is in the store
    digest: str | None = None
    xattrs: bytes = b""


class Matcher:
    """Exclusion patterns: with a '/' they match the path from the tree's
    root ('/etc', '/usr/share/doc/*'), without one the file's name."""

    def __init__(self, patterns: Iterable[str], extra_paths: Iterable[str] = ()) -> None:
        patterns = list(patterns)
        # One compiled regex per kind: this runs for every entry of every tree.
        self.anchored = _compile(p.rstrip("/") for p in patterns if "/" in p)
        self.names = _compile(p for p in patterns if "/" not in p)
        self.paths = set(extra_paths)

    def __call__(self, rel: str) -> bool:
        path = "/" + rel
        if path in self.paths:
            return True
        if self.anchored is not None and self.anchored.match(path):
            return True
        return self.names is not None and self.names.match(rel.rpartition("/")[2]) is not None


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    ps = list(patterns)
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in ps)) if ps else None


def conffiles(root_fd: int) -> set[str]:
    """Paths dpkg lists as conffiles in the tree's package database."""
    out: set[str] = set()
    try:
        info = open_beneath(root_fd, "var/lib/dpkg/info", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return out
    try:
        for name in os.listdir(info):
            if not name.endswith(".conffiles"):
                continue
            try:
                fd = open_beneath(info, name, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                with os.fdopen(os.dup(fd), "rb") as f:
                    text = f.read(1 << 22).decode("utf-8", "surrogateescape")
            finally:
                os.close(fd)
            out.update(tok for line in text.splitlines() for tok in line.split() if tok.startswith("/"))
    finally:
        os.close(info)
    return out


def xattr_key(fd: int) -> bytes:
    """Every xattr but our own, in a canonical order: part of a file's key."""
    items = sorted((n, os.getxattr(fd, n)) for n in os.listxattr(fd) if not mark.is_internal_xattr(n))
    return b"\0".join(n.encode() + b"=" + v.hex().encode() for n, v in items)


def hash_fd(fd: int, buf: bytearray, size: int) -> tuple[str, int]:
    """BLAKE3 of the file's content; size is what fstat said (small files are
    read in one call, a larger one in chunks into buf)."""
    if size < len(buf):
        data = os.read(fd, size + 1)  # +1: a file that grew shows it
        return blake3.blake3(data).hexdigest(), len(data)
    if size >= _MMAP_BYTES:
        # Big files: mapped (no copy) and hashed on every core.
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        h.update_mmap(proc_fd(fd))
        return h.hexdigest(), size
    h = blake3.blake3()
    view = memoryview(buf)
    total = 0
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
        total += n
    return h.hexdigest(), total


# --- the store -----------------------------------------------------------------


def default_store(trees: list[str]) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(trees[0])), STORE_NAME)


class Store:
    """A flat content-addressed directory: ab/<digest>-<tag>, each a hard link."""

    def __init__(self, path: str, create: bool = True) -> None:
        self.path = os.path.abspath(path)
        if create:
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                pass
        self.fd = open_tree(self.path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise errors.Busy(f"the store {self.path} is in use by another unify or gc") from None
        self.dev = os.fstat(self.fd).st_dev

    def close(self) -> None:
        os.close(self.fd)

    def entries(self) -> list[tuple[str, os.stat_result]]:
        out = []
        for rel, st in walk(self.fd):
            if stat.S_ISREG(st.st_mode) and "/" in rel:
                out.append((rel, st))
        return out

    def add(self, dir_fd: int, name: str, digest: str) -> str:
        sub = digest[:2]
        try:
            os.mkdir(sub, 0o700, dir_fd=self.fd)
        except FileExistsError:
            pass
        rel = f"{sub}/{digest}-{secrets.token_hex(4)}"
        sub_fd = open_beneath(self.fd, sub, os.O_RDONLY | os.O_DIRECTORY)
        try:
            linkat(dir_fd, name, sub_fd, rel.rpartition("/")[2])
        finally:
            os.close(sub_fd)
        return rel

    def gc(self) -> int:
        """Remove stored inodes no tree links to any more."""
        n = 0
        for rel, st in self.entries():
            if st.st_nlink == 1:
                os.unlink(rel, dir_fd=self.fd)
                n += 1
        for rel, st in list(walk(self.fd)):
            if stat.S_ISDIR(st.st_mode):
                try:
                    os.rmdir(rel, dir_fd=self.fd)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
            elif breaking.is_temp_name(rel.rpartition("/")[2].encode()):
                os.unlink(rel, dir_fd=self.fd)
        return n


# --- checks ----------------------------------------------------------------------


def check_trees(trees: list[str], store: str | None) -> None:
    if not trees:
        raise errors.UsageError("name at least one tree")
    real = []
    for t in trees:
        st = _lstat_dir(t)
        real.append((t, os.path.realpath(t), st.st_dev))
        live = serving(t)
        if live is not None:
            mp, pid = live
            who = f" (daemon pid {pid})" if pid else ""
            raise errors.Busy(f"{t} is served by the cowfs mount at {mp}{who}: stop its guest or unmount it first")
    seen: dict[str, str] = {}
    for t, r, _ in real:
        if r in seen:
            raise errors.UsageError(f"{t} and {seen[r]} are the same tree")
        seen[r] = t
    for t, r, _ in real:
        for t2, r2, _ in real:
            if r != r2 and r2.startswith(r + "/"):
                raise errors.UsageError(f"{t2} lies inside {t}")
    if store is not None:
        rs = os.path.realpath(store)
        parent_dev = os.stat(os.path.dirname(rs)).st_dev if not os.path.exists(rs) else os.stat(rs).st_dev
        for t, r, dev in real:
            if dev != parent_dev:
                raise errors.BadTree(f"{t} is on another filesystem than the store {store}: hard links cannot cross")
            if rs == r or rs.startswith(r + "/") or r.startswith(rs + "/"):
                raise errors.UsageError(f"the store {store} and the tree {t} overlap")


def _lstat_dir(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise errors.BadTree(f"{path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise errors.BadTree(f"{path} is not a directory")
    return st


# --- unify -----------------------------------------------------------------------


@dataclass(frozen=True)
class UnifyOptions:
    store: str | None = None
    ignore_mtime: bool = False
    excludes: tuple[str, ...] = ()
    default_excludes: bool = True
    min_size: int = MIN_SIZE
    dry_run: bool = False
    jobs: int = 0  # 0: one per CPU


def unify(trees: list[str], opts: UnifyOptions, progress: Progress | None = None) -> UnifyStats:
    t0 = time.monotonic()
    store_path = opts.store or default_store(trees)
    check_trees(trees, store_path)
    stats = UnifyStats(trees=len(trees))
    if opts.dry_run and not os.path.isdir(store_path):
        store = None
    else:
        store = Store(store_path)
    roots = [open_tree(t) for t in trees]
    try:
        times: list[dict[str, tuple[int, int]]] = [{} for _ in roots]
        inodes = _scan(roots, store, opts, stats, times, progress)
        groups = _hash(roots, store, inodes, opts, stats, progress)
        if not opts.dry_run:
            assert store is not None
            used = _link(roots, store, groups, stats, opts.jobs or os.cpu_count() or 1, progress)
            for root, t, u in zip(roots, times, used, strict=True):
                restore_times(root, t, u)
            stats.gc_removed = store.gc()
        else:
            _estimate(groups, stats)
    finally:
        for fd in roots:
            os.close(fd)
        if store is not None:
            store.close()
    stats.seconds = time.monotonic() - t0
    return stats


def _prekey(st: os.stat_result, ignore_mtime: bool) -> PreKey:
    return (st.st_size, st.st_mode, st.st_uid, st.st_gid, None if ignore_mtime else st.st_mtime_ns)


def _scan(
    roots: list[int],
    store: Store | None,
    opts: UnifyOptions,
    stats: UnifyStats,
    dir_times_of: list[dict[str, tuple[int, int]]],
    progress: Progress | None,
) -> dict[PreKey, dict[int, _Inode]]:
    by_key: dict[PreKey, dict[int, _Inode]] = defaultdict(dict)
    if store is not None:
        for rel, st in store.entries():
            ino = by_key[_prekey(st, opts.ignore_mtime)].setdefault(st.st_ino, _Inode(st))
            ino.store = rel
            ino.digest = rel.rpartition("/")[2].partition("-")[0]
    patterns = (DEFAULT_EXCLUDES if opts.default_excludes else ()) + opts.excludes

    def scan_tree(i: int) -> tuple[list[tuple[str, os.stat_result]], UnifyStats]:
        root, times, part = roots[i], dir_times_of[i], UnifyStats()
        dir_times("", os.fstat(root), times)
        excluded = Matcher(patterns, conffiles(root) if opts.default_excludes else ())
        dirs = DirCache(root)
        found = []

        def skip(rel: str, st: os.stat_result) -> bool:
            if excluded(rel):
                part.excluded += 1
                return True
            return False

        try:
            for rel, st in walk(root, skip, files_only=True):
                if not stat.S_ISREG(st.st_mode):
                    dir_times(rel, st, times)
                    continue
                d, base = split(rel)
                if breaking.is_temp_name(base.encode()):
                    if not opts.dry_run:  # a crashed run's or break's leftover
                        os.unlink(base, dir_fd=dirs.open(d))
                        part.temps_removed += 1
                    continue
                part.files += 1
                if st.st_size >= opts.min_size:
                    found.append((rel, st))
        finally:
            dirs.close()
        return found, part

    # One tree after another: walking in threads measured slower (the GIL).
    for i in range(len(roots)):
        found, part = scan_tree(i)
        stats.files += part.files
        stats.excluded += part.excluded
        stats.temps_removed += part.temps_removed
        for rel, st in found:
            by_key[_prekey(st, opts.ignore_mtime)].setdefault(st.st_ino, _Inode(st)).names.append((i, rel))
        if progress:
            progress("scan", i + 1, len(roots))
    return by_key


def _hash(
    roots: list[int],
    store: Store | None,
    by_key: dict[PreKey, dict[int, _Inode]],
    opts: UnifyOptions,
    stats: UnifyStats,
    progress: Progress | None,
) -> list[list[_Inode]]:
    """Groups of inodes with equal keys, the one to keep first."""
    todo: list[_Inode] = []
    for inodes in by_key.values():
        if len(inodes) < 2 or not any(ino.names for ino in inodes.values()):
            continue
        todo.extend(inodes.values())
    total = sum(ino.st.st_size for ino in todo if ino.store is None)

    def one(ino: _Inode, buf: bytearray) -> int:
        if ino.store is not None:
            assert store is not None
            fd = open_beneath(store.fd, ino.store, _READ_FLAGS)
        else:
            tree, rel = ino.names[0]
            fd = open_beneath(roots[tree], rel, _READ_FLAGS)
        try:
            st = os.fstat(fd)
            if not _same(st, ino.st):
                ino.digest = None
                return 0  # changed since the scan: left alone
            ino.xattrs = xattr_key(fd)
            if ino.store is None:
                ino.digest, n = hash_fd(fd, buf, st.st_size)
                return n
            return 0
        finally:
            os.close(fd)

    def work(batch: list[_Inode]) -> int:
        # Batches, not one task per file: most files are small, and a
        # future per file would cost more than hashing it.
        buf = bytearray(_CHUNK)
        return sum(one(ino, buf) for ino in batch)

    batches: list[list[_Inode]] = [[]]
    size = 0
    for ino in todo:
        if size > _BATCH_BYTES or len(batches[-1]) >= 256:
            batches.append([])
            size = 0
        batches[-1].append(ino)
        size += ino.st.st_size
    t = time.monotonic()
    done = 0
    with ThreadPoolExecutor(opts.jobs or os.cpu_count() or 1) as pool:
        for n in pool.map(work, batches):
            done += n
            stats.hashed_bytes += n
            if progress:
                progress("hash", done, total)
    stats.hash_seconds = time.monotonic() - t
    stats.candidates = sum(1 for ino in todo if ino.store is None)

    groups: dict[tuple[PreKey, str, bytes], list[_Inode]] = defaultdict(list)
    for ino in todo:
        if ino.digest is not None:
            groups[(_prekey(ino.st, opts.ignore_mtime), ino.digest, ino.xattrs)].append(ino)
    out = []
    for g in groups.values():
        if len(g) < 2 or not any(ino.names for ino in g):
            continue
        # Keep the stored inode, else the one with the most links (fewest renames).
        g.sort(key=lambda ino: (ino.store is None, -ino.st.st_nlink))
        out.append(g)
    return out


def _estimate(groups: list[list[_Inode]], stats: UnifyStats) -> None:
    for g in groups:
        stats.groups += 1
        for ino in g[1:]:
            stats.linked += len(ino.names)
            if ino.st.st_nlink == len(ino.names):
                stats.inodes_freed += 1
                stats.bytes_saved += ino.st.st_blocks * 512


def _link(
    roots: list[int],
    store: Store,
    groups: list[list[_Inode]],
    stats: UnifyStats,
    jobs: int,
    progress: Progress | None,
) -> list[set[str]]:
    """Returns the directories each tree had entries replaced in."""
    # In parallel: a rename that drops an inode's last link frees its blocks
    # inside the call, and that filesystem work is most of this phase.
    chunks = [groups[i : i + 64] for i in range(0, len(groups), 64)]
    done = 0
    used: list[set[str]] = [set() for _ in roots]
    with ThreadPoolExecutor(jobs) as pool:
        for (part, dirs), n in pool.map(lambda c: (_link_chunk(roots, store, c), len(c)), chunks):
            for u, d in zip(used, dirs, strict=True):
                u |= d
            for k, v in part.__dict__.items():
                if v:
                    setattr(stats, k, getattr(stats, k) + v)
            done += n
            if progress:
                progress("link", done, len(groups))
    return used


def _link_chunk(roots: list[int], store: Store, groups: list[list[_Inode]]) -> tuple[UnifyStats, list[set[str]]]:
    stats = UnifyStats()
    caches = [DirCache(fd) for fd in roots]
    try:
        for g in groups:
            keep = g[0]
            if keep.store is None:
                keep.store = _store_first(caches, store, keep)
                if keep.store is None:
                    stats.changed += 1
                    continue
                stats.store_added += 1
            _mark(store, keep.store)
            sub, _, sname = keep.store.partition("/")
            sub_fd = open_beneath(store.fd, sub, os.O_RDONLY | os.O_DIRECTORY)
            try:
                linked_any = False
                for ino in g[1:]:
                    done = 0
                    for tree, rel in sorted(ino.names):
                        if _replace(caches[tree], rel, ino.st, sub_fd, sname):
                            done += 1
                        else:
                            stats.changed += 1
                    stats.linked += done
                    linked_any = linked_any or done > 0
                    if done and done == ino.st.st_nlink:
                        stats.inodes_freed += 1
                        stats.bytes_saved += ino.st.st_blocks * 512
                stats.groups += linked_any
            finally:
                os.close(sub_fd)
    finally:
        for c in caches:
            c.close()
    return stats, [c.used for c in caches]


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    # Not the ctime: linking and replacing other names of the inode change it.
    return (a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_size, b.st_mtime_ns)


def _store_first(caches: list[DirCache], store: Store, ino: _Inode) -> str | None:
    """Link the inode to keep into the store; None if it changed meanwhile."""
    tree, rel = ino.names[0]
    d, base = split(rel)
    dfd = caches[tree].open(d)
    assert ino.digest is not None
    srel = store.add(dfd, base, ino.digest)
    if not _same(os.stat(srel, dir_fd=store.fd, follow_symlinks=False), ino.st):
        os.unlink(srel, dir_fd=store.fd)
        return None
    return srel


def _mark(store: Store, srel: str) -> None:
    fd = open_beneath(store.fd, srel, O_PATH_NOFOLLOW)
    try:
        if not mark.is_marked(fd=fd):
            mark.set_mark(fd=fd)
    finally:
        os.close(fd)


def _replace(cache: DirCache, rel: str, expect: os.stat_result, sub_fd: int, sname: str) -> bool:
    """Atomically make rel a link to the store's sname, if rel is still expect."""
    d, base = split(rel)
    try:
        dfd = cache.open(d)
        if not _same(os.stat(base, dir_fd=dfd, follow_symlinks=False), expect):
            return False
    except (FileNotFoundError, NotADirectoryError):
        return False
    tmp = breaking.TEMP_PREFIX + secrets.token_hex(8).encode()
    linkat(sub_fd, sname, dfd, tmp)
    try:
        renameat2(dfd, tmp, dfd, base.encode())
    except BaseException:
        os.unlink(tmp, dir_fd=dfd)
        raise
    return True


# --- revert ----------------------------------------------------------------------


@dataclass
class RevertStats:
    files: int = 0
    copied: int = 0  # inodes given a private copy
    bytes_copied: int = 0
    unmarked: int = 0
    gc_removed: int = 0
    seconds: float = 0.0


def revert(trees: list[str], store_path: str | None, dry_run: bool = False) -> RevertStats:
    """Give each tree private copies of every file it shares with anything.

    The tree's own hard-link groups stay groups: one copy per inode, renamed
    over each of its names.
    """
    t0 = time.monotonic()
    check_trees(trees, None)
    stats = RevertStats()
    for t in trees:
        root = open_tree(t)
        try:
            _revert_tree(root, stats, dry_run)
        finally:
            os.close(root)
    store_path = store_path or default_store(trees)
    if not dry_run and os.path.isdir(store_path):
        store = Store(store_path, create=False)
        try:
            stats.gc_removed = store.gc()
        finally:
            store.close()
    stats.seconds = time.monotonic() - t0
    return stats


def _revert_tree(root: int, stats: RevertStats, dry_run: bool) -> None:
    inodes: dict[int, _Inode] = {}
    times: dict[str, tuple[int, int]] = {}
    dir_times("", os.fstat(root), times)
    for rel, st in walk(root):
        dir_times(rel, st, times)
        if stat.S_ISREG(st.st_mode) and not breaking.is_temp_name(split(rel)[1].encode()):
            stats.files += 1
            inodes.setdefault(st.st_ino, _Inode(st)).names.append((0, rel))
    cache = DirCache(root)
    try:
        for ino in inodes.values():
            tree_names = sorted(rel for _, rel in ino.names)
            d, base = split(tree_names[0])
            if ino.st.st_nlink <= len(tree_names):
                if dry_run:
                    continue
                fd = open_beneath(cache.open(d), base, O_PATH_NOFOLLOW)
                try:
                    stats.unmarked += mark.clear_mark(fd=fd)
                finally:
                    os.close(fd)
                continue
            stats.copied += 1
            stats.bytes_copied += ino.st.st_size
            if dry_run:
                continue
            dfd = cache.open(d)
            src = open_beneath(dfd, base, O_PATH_NOFOLLOW)
            try:
                if not _same(os.fstat(src), ino.st):
                    continue
                tmp = breaking.make_copy(dfd, src)
            finally:
                os.close(src)
            try:
                for rel in tree_names:
                    d, base = split(rel)
                    dfd = cache.open(d)
                    if os.stat(base, dir_fd=dfd, follow_symlinks=False).st_ino == ino.st.st_ino:
                        breaking.install(tmp, dfd, base.encode())
            finally:
                os.close(tmp)
    finally:
        cache.close()
        restore_times(root, times, cache.used)


def gc(store_path: str) -> int:
    if not os.path.isdir(store_path):
        raise errors.BadTree(f"store {store_path} does not exist")
    store = Store(store_path, create=False)
    try:
        return store.gc()
    finally:
        store.close()
