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
import stat
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import blake3

from . import breaking, errors, forked, mark
from .sys import O_PATH_NOFOLLOW, linkat, open_beneath, proc_fd, renameat2
from .walk import DIR_FLAGS, DirCache, dir_times, open_tree, restore_times, split, walk

MIN_SIZE = 16
# Like vhashify: what a guest's admin edits or what must stay secret.
DEFAULT_EXCLUDES = ("/etc", "/var", "/home", "/tmp", "/root", "/run", "*.key", "*.pem", "ssh_host_*")
STORE_NAME = ".cowfs-store"
_CHUNK = 1 << 20
_MMAP_BYTES = 4 << 20
# O_NONBLOCK: a name that became a fifo since the scan must not hang us.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_NONBLOCK | os.O_CLOEXEC

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


class Meta(NamedTuple):
    """What unify keeps of an inode's stat: named as in os.stat_result."""

    st_ino: int
    st_size: int
    st_mode: int
    st_uid: int
    st_gid: int
    st_mtime_ns: int
    st_nlink: int
    st_blocks: int


def _meta(st: os.stat_result) -> tuple[int, int, int, int, int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink, st.st_blocks)


@dataclass
class _Inode:
    st: Meta
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

    def __call__(self, rel: str, name: str | None = None) -> bool:
        """name: rel's last component, where the caller has it already."""
        path = "/" + rel
        if path in self.paths:
            return True
        if self.anchored is not None and self.anchored.match(path):
            return True
        return self.names is not None and self.names.match(name or rel.rpartition("/")[2]) is not None


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
    names = os.listxattr(fd)
    if names == [mark.IUNLINK] or not names:  # the common cases, without the generic path
        return b""
    items = sorted((n, os.getxattr(fd, n)) for n in names if not mark.is_internal_xattr(n))
    return b"\0".join(n.encode() + b"=" + v.hex().encode() for n, v in items)


def hash_fd(fd: int, buf: bytearray, size: int, threads: bool = True) -> tuple[str, int]:
    """BLAKE3 of the file's content; size is what fstat said.  Read into buf
    (no allocation per file), in one call where it fits; with threads, a big
    file is mapped and hashed on every core."""
    view = memoryview(buf)
    if size < len(buf):
        n = os.readv(fd, [buf])  # size + 1 fits: a file that grew shows it
        return blake3.blake3(view[:n]).hexdigest(), n
    if threads and size >= _MMAP_BYTES:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        h.update_mmap(proc_fd(fd))
        return h.hexdigest(), size
    # Mapped without threads measured slower than reading (page faults).
    h = blake3.blake3()
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
        # The lock has an fd of its own that forked workers close: a killed
        # unify's store is free at once, whatever its workers are doing.
        self.lock_fd = open_tree(self.path)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            raise errors.Busy(f"the store {self.path} is in use by another unify or gc") from None
        forked.parent_only.add(self.lock_fd)
        self.fd = open_tree(self.path)
        self.dev = os.fstat(self.fd).st_dev

    def close(self) -> None:
        os.close(self.fd)
        forked.parent_only.discard(self.lock_fd)
        os.close(self.lock_fd)

    def entries(self) -> list[tuple[str, os.stat_result]]:
        out = []
        for rel, st in walk(self.fd):
            if stat.S_ISREG(st.st_mode) and "/" in rel:
                out.append((rel, st))
        return out

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
    from .daemon import serving  # only here: the daemon's imports are a third of unify's start-up

    real = []
    for t in trees:
        st = _lstat_dir(t)
        real.append((t, os.path.realpath(t), st.st_dev))
        if _is_private(t):
            raise errors.BadTree(
                f"{t} is a tree of private copies, served without cowfs: a link into it would let its guest"
                " write into every tree sharing the file"
            )
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


def _is_private(path: str) -> bool:
    try:
        os.getxattr(path, mark.PRIVATE)
    except OSError:
        return False
    return True


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


def hashed_paths(trees: list[str], opts: UnifyOptions) -> list[str]:
    """The files a dry run of unify hashes, one name per inode (what
    benchmarks/disk.py hashes alone, to compare unify with the hash)."""
    roots = [open_tree(t) for t in trees]
    try:
        times: list[dict[str, tuple[int, int]]] = [{} for _ in roots]
        todo = _to_hash(_scan(roots, None, replace(opts, dry_run=True), UnifyStats(), times, None))
    finally:
        for fd in roots:
            os.close(fd)
    return [os.path.join(trees[ino.names[0][0]], ino.names[0][1]) for ino in todo if ino.names and ino.store is None]


def _prekey(st: Meta, ignore_mtime: bool) -> PreKey:
    return (st.st_size, st.st_mode, st.st_uid, st.st_gid, None if ignore_mtime else st.st_mtime_ns)


# One tree's scan, as a worker sends it back (builtin types: marshalled):
# (tree index, relative paths of candidate files, their inode numbers,
#  directory times, files examined, paths excluded, temporaries removed)
_TreeScan = tuple[int, list[str], list[int], dict[str, tuple[int, int]], int, int, int]
# A worker's share: the stat of each inode it met, once, and its trees.
_ShareScan = tuple[dict[int, tuple[int, int, int, int, int, int, int, int]], list[_TreeScan]]
_TEMP_PREFIX = breaking.TEMP_PREFIX.decode()


def _scan(
    roots: list[int],
    store: Store | None,
    opts: UnifyOptions,
    stats: UnifyStats,
    dir_times_of: list[dict[str, tuple[int, int]]],
    progress: Progress | None,
) -> dict[PreKey, dict[int, _Inode]]:
    """Every tree's candidate files grouped by pre-key, then by inode.

    The trees are shared among forked workers (walking is syscalls and
    Python between them: threads measured slower than one).  Each inode is
    stat'ed once: clones of a template hold the same inodes, and a
    directory entry carries its inode number for free.
    """
    by_key: dict[PreKey, dict[int, _Inode]] = defaultdict(dict)
    inodes: dict[int, _Inode] = {}
    if store is not None:
        for rel, st in store.entries():
            ino = inodes[st.st_ino] = _Inode(Meta(*_meta(st)), store=rel)
            ino.digest = rel.rpartition("/")[2].partition("-")[0]
            by_key[_prekey(ino.st, opts.ignore_mtime)][st.st_ino] = ino
    patterns = (DEFAULT_EXCLUDES if opts.default_excludes else ()) + opts.excludes
    jobs = min(opts.jobs or os.cpu_count() or 1, len(roots)) if forked.can_fork() else 1
    shares = [list(range(len(roots)))[k::jobs] for k in range(jobs)]
    results = forked.fork_map(lambda share: _scan_share(roots, share, patterns, opts), shares)
    # Names are kept only for inodes that may be linked: those whose pre-key
    # another inode (of a tree or the store) shares.  Most names are of
    # inodes clones share already, and building them all is a third of a scan.
    metas: dict[int, tuple[int, int, int, int, int, int, int, int]] = {}
    held: set[int] = set()
    for m, trees in results:
        metas.update(m)
        for _, _, inos, *_ in trees:
            held.update(inos)
    keyed: dict[PreKey, list[Meta]] = defaultdict(list)
    for n in held:
        if n not in inodes:
            meta = Meta(*metas[n])
            keyed[_prekey(meta, opts.ignore_mtime)].append(meta)
    wanted: set[int] = set()
    for key, ms in keyed.items():
        if len(ms) > 1 or key in by_key:
            for meta in ms:
                wanted.add(meta.st_ino)
                inodes[meta.st_ino] = by_key[key][meta.st_ino] = _Inode(meta)
    wanted.update(n for n, node in inodes.items() if node.store is not None)
    done = 0
    for _, trees in results:
        for i, rels, inos, times, files, excluded, temps in trees:
            dir_times_of[i].update(times)
            stats.files += files
            stats.excluded += excluded
            stats.temps_removed += temps
            for rel, n in zip(rels, inos, strict=True):
                if n in wanted:
                    inodes[n].names.append((i, rel))
            done += 1
            if progress:
                progress("scan", done, len(roots))
    return by_key


def _scan_share(roots: list[int], share: list[int], patterns: tuple[str, ...], opts: UnifyOptions) -> _ShareScan:
    metas: dict[int, tuple[int, int, int, int, int, int, int, int]] = {}
    out: list[_TreeScan] = []
    for i in share:
        root = roots[i]
        sc = _TreeScanner(metas, Matcher(patterns, conffiles(root) if opts.default_excludes else ()), opts)
        dir_times("", os.fstat(root), sc.times)
        sc.scan_dir(root, "")
        out.append((i, sc.rels, sc.inos, sc.times, sc.files, sc.excluded, sc.temps))
    return metas, out


class _TreeScanner:
    def __init__(
        self, metas: dict[int, tuple[int, int, int, int, int, int, int, int]], excluded: Matcher, opts: UnifyOptions
    ) -> None:
        self.metas = metas  # shared by the trees of one share
        self.is_excluded = excluded
        self.min_size = opts.min_size
        self.dry_run = opts.dry_run
        self.times: dict[str, tuple[int, int]] = {}
        self.rels: list[str] = []
        self.inos: list[int] = []
        self.files = self.excluded = self.temps = 0

    def scan_dir(self, dfd: int, rel: str) -> None:
        subdirs: list[tuple[str, str]] = []
        metas = self.metas
        with os.scandir(dfd) as it:
            for e in it:
                name = e.name
                r = f"{rel}/{name}" if rel else name
                if e.is_file(follow_symlinks=False):
                    if self.is_excluded(r, name):
                        self.excluded += 1
                    elif name.startswith(_TEMP_PREFIX):
                        if not self.dry_run:  # a crashed run's or break's leftover
                            os.unlink(name, dir_fd=dfd)
                            self.temps += 1
                    else:
                        self.files += 1
                        n = e.inode()  # d_ino: no syscall
                        m = metas.get(n)
                        if m is None:
                            st = e.stat(follow_symlinks=False)
                            if not stat.S_ISREG(st.st_mode):
                                continue  # replaced while we looked
                            n = st.st_ino
                            m = metas[n] = _meta(st)
                        if m[1] >= self.min_size:
                            self.rels.append(r)
                            self.inos.append(n)
                elif e.is_dir(follow_symlinks=False):
                    if self.is_excluded(r, name):
                        self.excluded += 1
                    else:
                        subdirs.append((name, r))
        for name, r in subdirs:
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=dfd)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone while we walked
            try:
                dir_times(r, os.fstat(sub), self.times)
                self.scan_dir(sub, r)
            finally:
                os.close(sub)


def _to_hash(by_key: dict[PreKey, dict[int, _Inode]]) -> list[_Inode]:
    """Inodes whose pre-key some other inode shares (the store's included,
    unhashed ones only where a tree holds one of the group), in tree and
    path order: workers that take runs of it read directory by directory."""
    todo: list[_Inode] = []
    for inodes in by_key.values():
        if len(inodes) < 2 or not any(ino.names for ino in inodes.values()):
            continue
        todo.extend(inodes.values())
    todo.sort(key=lambda ino: ino.names[0] if ino.names else (-1, ino.store or ""))
    return todo


def _hash(
    roots: list[int],
    store: Store | None,
    by_key: dict[PreKey, dict[int, _Inode]],
    opts: UnifyOptions,
    stats: UnifyStats,
    progress: Progress | None,
) -> list[list[_Inode]]:
    """Groups of inodes with equal keys, the one to keep first.

    Hashed by forked workers, each a run of the inodes of about equal
    bytes: per file it is a few syscalls and a hash, and in one process the
    GIL serialises all but the hashing of large inputs.
    """
    todo = _to_hash(by_key)
    jobs = (opts.jobs or os.cpu_count() or 1) if forked.can_fork() else 1
    weights = [_PER_FILE_BYTES + (0 if ino.store is not None else ino.st.st_size) for ino in todo]
    bounds = [0]
    total, acc = sum(weights), 0
    for k, w in enumerate(weights):
        acc += w
        if acc >= total * len(bounds) / jobs and len(bounds) < jobs:
            bounds.append(k + 1)
    bounds.append(len(todo))
    shares = [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1) if bounds[k] < bounds[k + 1]]
    store_fd = store.fd if store is not None else -1
    to_read = sum(ino.st.st_size for ino in todo if ino.store is None)
    t = time.monotonic()
    for (lo, _), (results, nbytes) in zip(
        shares,
        forked.fork_map(lambda sh: _hash_run(roots, store_fd, todo[sh[0] : sh[1]], len(shares) == 1), shares),
        strict=True,
    ):
        for ino, (digest, xattrs) in zip(todo[lo:], results, strict=False):
            ino.digest, ino.xattrs = digest, xattrs
        stats.hashed_bytes += nbytes
        if progress:
            progress("hash", stats.hashed_bytes, to_read)
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


# What opening, checking and closing a file weighs against hashing its bytes
# (about 15 us here, what BLAKE3 takes for 45 KiB).
_PER_FILE_BYTES = 48 << 10


# Files opened ahead of the one being hashed, their reading started: with a
# cold cache each small file is a disk round trip, and these overlap them.
_AHEAD = 8
_AHEAD_BYTES = 2 << 20  # of each file (the kernel's readahead does the rest)


def _hash_run(
    roots: list[int], store_fd: int, run: list[_Inode], threads: bool
) -> tuple[list[tuple[str | None, bytes]], int]:
    """(digest or None if it changed since the scan, xattr key) of each inode
    in run, and the bytes read.  threads: big files may use every core (not
    in a forked worker: blake3's thread pool does not survive a fork)."""
    buf = bytearray(_CHUNK)
    caches = [DirCache(fd) for fd in roots]
    out: list[tuple[str | None, bytes]] = []
    nbytes = 0

    def open_ahead(ino: _Inode) -> int:
        if ino.store is not None:
            return open_beneath(store_fd, ino.store, _READ_FLAGS)  # hashed already: not read
        tree, rel = ino.names[0]
        d, base = split(rel)
        try:
            # the directory was opened beneath the root, no link followed
            fd = os.open(base, _READ_FLAGS, dir_fd=caches[tree].open(d))
        except (FileNotFoundError, NotADirectoryError):
            return -1
        os.posix_fadvise(fd, 0, min(ino.st.st_size, _AHEAD_BYTES), os.POSIX_FADV_WILLNEED)
        return fd

    ahead = deque(open_ahead(ino) for ino in run[:_AHEAD])
    try:
        for k, ino in enumerate(run):
            fd = ahead.popleft()
            if k + _AHEAD < len(run):
                ahead.append(open_ahead(run[k + _AHEAD]))
            if fd < 0:
                out.append((None, b""))
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or not _same(st, ino.st):
                    out.append((None, b""))  # changed since the scan: left alone
                    continue
                xattrs = xattr_key(fd)
                if ino.store is not None:
                    out.append((ino.digest, xattrs))
                    continue
                digest, n = hash_fd(fd, buf, st.st_size, threads)
                nbytes += n
                out.append((digest, xattrs))
            finally:
                os.close(fd)
    finally:
        for fd in ahead:
            if fd >= 0:
                os.close(fd)
        for c in caches:
            c.close()
    return out, nbytes


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
    """Keep one inode of each group in the store, marked, then replace every
    other name by a link to it.  Returns the directories each tree had
    entries replaced in.

    The replacing is most of the work: a rename that drops an inode's last
    link frees it inside the call.  It is shared among forked workers in
    tree and directory order, so each opens every directory once.
    """
    subs = _StoreDirs(store)
    work: list[tuple[int, str, Meta, str, str]] = []  # tree, path, inode expected there, store dir, store name
    owners: list[_Inode] = []  # the inode each entry of work replaces
    try:
        for g in groups:
            keep = g[0]
            if keep.store is None:
                keep.store = _store_first(roots, store, subs, keep)
                if keep.store is None:
                    stats.changed += 1
                    continue
                stats.store_added += 1
            _mark(store, keep.store)
            sub, _, sname = keep.store.partition("/")
            for ino in g[1:]:
                for tree, rel in ino.names:
                    work.append((tree, rel, ino.st, sub, sname))
                    owners.append(ino)
    finally:
        subs.close()
    order = sorted(range(len(work)), key=lambda k: (work[k][0], work[k][1]))
    jobs = max(1, min(jobs if forked.can_fork() else 1, len(work) // 64))
    shares = [order[k * len(order) // jobs : (k + 1) * len(order) // jobs] for k in range(jobs)]
    failed: set[int] = set()
    used: list[set[str]] = [set() for _ in roots]
    done = 0
    for share, (bad, dirs) in zip(
        shares, forked.fork_map(lambda sh: _replace_run(roots, store, work, sh), shares), strict=True
    ):
        failed.update(bad)
        for u, ds in zip(used, dirs, strict=True):
            u.update(ds)
        done += len(share)
        if progress:
            progress("link", done, len(work))
    replaced: dict[int, int] = defaultdict(int)  # id(inode) -> names replaced
    for k, ino in enumerate(owners):
        if k in failed:
            stats.changed += 1
        else:
            replaced[id(ino)] += 1
    stats.linked += sum(replaced.values())
    for g in groups:
        if g[0].store is None:
            continue
        linked_any = False
        for ino in g[1:]:
            n = replaced.get(id(ino), 0)
            linked_any = linked_any or n > 0
            if n and n == ino.st.st_nlink:
                stats.inodes_freed += 1
                stats.bytes_saved += ino.st.st_blocks * 512
        stats.groups += linked_any
    return used


class _StoreDirs:
    """The store's two-hex-digit directories, made once and kept open."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fds: dict[str, int] = {}

    def open(self, sub: str) -> int:
        fd = self.fds.get(sub)
        if fd is None:
            try:
                os.mkdir(sub, 0o700, dir_fd=self.store.fd)
            except FileExistsError:
                pass
            fd = self.fds[sub] = open_beneath(self.store.fd, sub, os.O_RDONLY | os.O_DIRECTORY)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _replace_run(
    roots: list[int], store: Store, work: list[tuple[int, str, Meta, str, str]], run: list[int]
) -> tuple[list[int], list[list[str]]]:
    """Replace the names of work[k] for k in run; returns the k that changed
    meanwhile and were left alone, and the directories used in each tree."""
    caches = [DirCache(fd) for fd in roots]
    subs = _StoreDirs(store)
    failed: list[int] = []
    try:
        for k in run:
            tree, rel, expect, sub, sname = work[k]
            if not _replace(caches[tree], rel, expect, subs.open(sub), sname):
                failed.append(k)
    finally:
        subs.close()
        for c in caches:
            c.close()
    return failed, [sorted(c.used) for c in caches]


def _same(a: os.stat_result, b: Meta) -> bool:
    # Not the ctime: linking and replacing other names of the inode change it.
    return (a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_size, b.st_mtime_ns)


def _store_first(roots: list[int], store: Store, subs: _StoreDirs, ino: _Inode) -> str | None:
    """Link the inode to keep into the store; None if it changed meanwhile."""
    tree, rel = ino.names[0]
    d, base = split(rel)
    assert ino.digest is not None
    sub = ino.digest[:2]
    sname = f"{ino.digest}-{os.urandom(4).hex()}"
    dfd = open_beneath(roots[tree], d or ".", DIR_FLAGS)
    try:
        linkat(dfd, base, subs.open(sub), sname)
    finally:
        os.close(dfd)
    srel = f"{sub}/{sname}"
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


def _replace(cache: DirCache, rel: str, expect: Meta, sub_fd: int, sname: str) -> bool:
    """Atomically make rel a link to the store's sname, if rel is still expect."""
    d, base = split(rel)
    try:
        dfd = cache.open(d)
        if not _same(os.stat(base, dir_fd=dfd, follow_symlinks=False), expect):
            return False
    except (FileNotFoundError, NotADirectoryError):
        return False
    tmp = breaking.TEMP_PREFIX + os.urandom(8).hex().encode()
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
            inodes.setdefault(st.st_ino, _Inode(Meta(*_meta(st)))).names.append((0, rel))
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
