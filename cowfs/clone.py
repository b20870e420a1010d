"""`cowfs clone`: a guest backing tree as hard links to a template.

Directories, symlinks and special files are copied with their metadata;
every regular file becomes a hard link to the template's inode, which gets
the mark.  With copy, every regular file is a private copy instead (hard
links within the template stay links within the copy) and the tree's root
says so (PRIVATE): a tree served without cowfs, which unify never links
into.  The tree is built under a temporary sibling name and renamed into
place at the end, so DEST either does not exist or is complete.

The work is syscalls, thousands per tree, and the kernel runs link(2)s in
different directories in parallel (two `cp -al` at once take the time of
one), so after one pass that reads the template's directories, the tree is
cut into subtrees of about equal work for one forked worker per CPU.
Processes, not threads: between syscalls Python holds the GIL, and threads
measured no faster than one.

This module is on the path of `cowfs clone` and `vctx create`: it imports
nothing it does not need (start-up is part of the clone's time).
"""

from __future__ import annotations

import errno
import os
import stat
import time

from . import breaking, errors, forked, mark
from .sys import link_fd, open_beneath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A worker's share below this many entries is not worth a fork.
_MIN_SHARE = 400


class CloneStats:
    __slots__ = ("copied", "dirs", "files", "marked", "other", "seconds", "workers")

    def __init__(self) -> None:
        self.workers = 1  # processes that shared the work
        self.seconds = 0.0
        self.dirs = 0
        self.files = 0
        self.marked = 0  # template inodes that were not marked yet
        self.other = 0  # symlinks and special files
        self.copied = False  # private copies, not links

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__slots__}

    def summary(self, as_json: bool = False) -> str:
        if as_json:
            import json

            return json.dumps({**self.as_dict(), "seconds": round(self.seconds, 3)})
        if self.copied:
            return f"copied {self.files} files, {self.dirs} directories, {self.other} others in {self.seconds:.2f}s"
        return (
            f"cloned {self.files} files, {self.dirs} directories, {self.other} others in {self.seconds:.2f}s"
            f" ({self.marked} newly marked)"
        )

    def add(self, counts: tuple[int, int, int, int]) -> None:
        self.dirs += counts[0]
        self.files += counts[1]
        self.marked += counts[2]
        self.other += counts[3]


class _Node:
    """A template directory: its path below the roots ("" for the root), the
    names of its regular files and of its other entries, its subdirectories,
    and the work of cloning all that (a new inode costs more than a link)."""

    __slots__ = ("cost", "files", "others", "rel", "subdirs")

    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.files: list[str] = []
        self.others: list[str] = []
        self.subdirs: list[_Node] = []
        self.cost = 0  # of the whole subtree

    def own_cost(self) -> int:
        """The directory and its entries, without its subdirectories'."""
        return 8 + len(self.files) + 6 * len(self.others)


def _scan(src: int, rel: str) -> _Node:
    """The template's directory tree, read once (nothing is made yet)."""
    node = _Node(rel)
    names: list[str] = []
    with os.scandir(src) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                node.files.append(e.name)
            elif e.is_dir(follow_symlinks=False):
                names.append(e.name)
            else:
                node.others.append(e.name)
    node.cost = node.own_cost()
    for name in names:
        sub = os.open(name, _DIR_FLAGS, dir_fd=src)
        try:
            child = _scan(sub, f"{rel}/{name}" if rel else name)
        finally:
            os.close(sub)
        node.subdirs.append(child)
        node.cost += child.cost + 8
    return node


def _base(rel: str) -> str:
    return rel.rpartition("/")[2]


def _copy_xattrs(src: int | str, dst: int | str, follow: bool = True) -> None:
    for x in os.listxattr(src, follow_symlinks=follow):
        if not mark.is_internal_xattr(x):
            os.setxattr(dst, x, os.getxattr(src, x, follow_symlinks=follow), follow_symlinks=follow)


_Counts = tuple[int, int, int, int]  # dirs, files, marked, others


def _plus(a: _Counts, b: _Counts) -> _Counts:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


def _open_pair(sroot: int, droot: int, rel: str) -> tuple[int, int]:
    """The directory rel in the template and in the clone, opened from their
    roots without following links (the clone's side is ours alone, a 0700
    directory nobody else writes, but it is opened the same way)."""
    s = open_beneath(sroot, rel or ".", _DIR_FLAGS)
    try:
        return s, open_beneath(droot, rel or ".", _DIR_FLAGS)
    except BaseException:
        os.close(s)
        raise


# A copy's hard-link groups: (st_dev, st_ino) of the template's inode -> the
# copy's first name for it, from the root.  None: a linked clone.
_Links = dict[tuple[int, int], str] | None


def _fill(sroot: int, droot: int, node: _Node, subtree: bool, links: _Links = None) -> _Counts:
    """Link, copy and mark the entries of node's directory.  With subtree,
    also make its subdirectories, fill them the same way, and give each
    directory its metadata (after its entries: each one made changes the
    mtime).

    Changes the working directory: Python has no getxattr relative to a
    directory fd, and a name relative to the cwd is the cheapest way to the
    inode.  The caller puts it back.
    """
    dirs = files = marked = other = 0
    s, d = _open_pair(sroot, droot, node.rel)
    try:
        if subtree:
            for sub in node.subdirs:
                os.mkdir(_base(sub.rel), 0o700, dir_fd=d)
        try:
            os.fchdir(s)
            if links is not None:
                for name in node.files:
                    _copy_file(s, d, droot, name, node.rel, links)
            else:
                for name in node.files:
                    try:
                        os.getxattr(name, mark.IUNLINK, follow_symlinks=False)
                    except OSError as e:
                        if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                            raise
                        mark.set_mark(path=name)
                        marked += 1
                    os.link(name, name, src_dir_fd=s, dst_dir_fd=d, follow_symlinks=False)
            files += len(node.files)
            for name in node.others:
                _copy_other(s, d, name)
            other += len(node.others)
        except OSError as e:
            # A name alone says little: say which directory, from the
            # template's root (clone() puts the template in front).
            if isinstance(e.filename, str) and "/" not in e.filename and node.rel:
                e.filename = f"{node.rel}/{e.filename}"
            raise
        if subtree:
            _copy_dir_meta(s, d)
            dirs += 1
    finally:
        os.close(s)
        os.close(d)
    counts = (dirs, files, marked, other)
    if subtree:
        for sub in node.subdirs:
            counts = _plus(counts, _fill(sroot, droot, sub, True, links))
    return counts


def _copy_file(s: int, d: int, droot: int, name: str, rel: str, links: dict[tuple[int, int], str]) -> None:
    """A private copy of s/name as d/name (breaking's copy: data, owner,
    mode, xattrs but the mark, times), or a link to the copy made already."""
    st = os.stat(name, dir_fd=s, follow_symlinks=False)
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        os.link(links[key], name, src_dir_fd=droot, dst_dir_fd=d, follow_symlinks=False)
        return
    src = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=s)
    try:
        tmp = breaking.make_copy(d, src)
    finally:
        os.close(src)
    try:
        link_fd(tmp, d, name.encode())
    finally:
        os.close(tmp)
    if st.st_nlink > 1:
        links[key] = f"{rel}/{name}" if rel else name


def _copy_dir_meta(s: int, d: int) -> None:
    st = os.fstat(s)
    _copy_xattrs(s, d)
    os.fchown(d, st.st_uid, st.st_gid)
    os.fchmod(d, stat.S_IMODE(st.st_mode))
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_other(s: int, d: int, name: str) -> None:
    st = os.stat(name, dir_fd=s, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=s), name, dir_fd=d)
    elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        # The template changed under us: the scan saw something else here.
        raise errors.BadTree(f"template entry {name} changed during the clone")
    else:
        os.mknod(name, st.st_mode, st.st_rdev, dir_fd=d)
        # fchdir'ed into s: the name reaches the node without opening it
        _copy_xattrs(name, f"/proc/self/fd/{d}/{name}", follow=False)
    os.chown(name, st.st_uid, st.st_gid, dir_fd=d, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=d)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=d, follow_symlinks=False)


# A share of the work: (directory, with its whole subtree?).
_Unit = tuple[_Node, bool]


def _split(root: _Node, jobs: int) -> tuple[list[_Node], list[list[_Unit]]]:
    """Cut the tree for jobs workers: directories too big for one worker's
    share (the top) are made first by the caller and have only their own
    entries filled by a worker; below them, whole subtrees go to the least
    loaded worker, largest first."""
    jobs = max(1, min(jobs, root.cost // _MIN_SHARE))
    top: list[_Node] = []
    units: list[_Unit] = []
    limit = root.cost // (4 * jobs) if jobs > 1 else root.cost + 1
    stack = [root]
    while stack:
        n = stack.pop()
        if n is root or (n.cost > limit and n.subdirs):
            top.append(n)  # parents before children
            units.append((n, False))
            stack.extend(n.subdirs)
        else:
            units.append((n, True))

    def cost(u: _Unit) -> int:
        n, subtree = u
        return n.cost if subtree else n.own_cost()

    shares: list[list[_Unit]] = [[] for _ in range(jobs)]
    loads = [0] * jobs
    for u in sorted(units, key=cost, reverse=True):
        i = loads.index(min(loads))
        shares[i].append(u)
        loads[i] += cost(u)
    return top, [sh for sh in shares if sh]


def _fill_share(sroot: int, droot: int, share: list[_Unit], links: _Links) -> _Counts:
    total = (0, 0, 0, 0)
    for node, subtree in share:
        if subtree:
            os.mkdir(node.rel, 0o700, dir_fd=droot)
        total = _plus(total, _fill(sroot, droot, node, subtree, links))
    return total


def clone(template: str, dest: str, jobs: int = 0, copy: bool = False) -> CloneStats:
    """Clone template to dest; jobs: worker processes (0: one per CPU).
    copy: private copies of the files instead of links (one process: it
    keeps the template's hard-link groups together)."""
    t0 = time.monotonic()
    template, dest = os.path.abspath(template), os.path.abspath(dest)
    try:
        tst = os.stat(template, follow_symlinks=False)
    except FileNotFoundError:
        raise errors.BadTree(f"template {template} does not exist") from None
    if not stat.S_ISDIR(tst.st_mode):
        raise errors.BadTree(f"template {template} is not a directory")
    if os.path.lexists(dest):
        raise errors.BadTree(f"destination {dest} already exists")
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise errors.BadTree(f"destination's directory {parent} does not exist")
    if os.stat(parent).st_dev != tst.st_dev:
        raise errors.BadTree(f"{dest} is on another filesystem than {template}: hard links cannot cross")
    partial = os.path.join(parent, f".{os.path.basename(dest)}.cowfs-partial-{os.urandom(4).hex()}")
    os.mkdir(partial, 0o700)
    stats = CloneStats()
    stats.copied = copy
    cwd = os.open(".", os.O_PATH | os.O_CLOEXEC)
    try:
        s = os.open(template, _DIR_FLAGS)
        d = os.open(partial, _DIR_FLAGS)
        try:
            tree = _scan(s, "")
            links: _Links = {} if copy else None
            if copy or not forked.can_fork():
                jobs = 1
            top, shares = _split(tree, jobs or os.cpu_count() or 1)
            for n in top[1:]:
                os.mkdir(n.rel, 0o700, dir_fd=d)
            stats.workers = len(shares)
            for counts in forked.fork_map(lambda sh: _fill_share(s, d, sh, links), shares):
                stats.add(counts)
            # The top's metadata last, the root's very last: its 0700 keeps
            # everyone out until every entry is in.
            for n in reversed(top):
                s2, d2 = _open_pair(s, d, n.rel)
                try:
                    _copy_dir_meta(s2, d2)
                finally:
                    os.close(s2)
                    os.close(d2)
            if copy:
                os.setxattr(d, mark.PRIVATE, b"")
            stats.dirs += len(top) - 1  # the root is not counted
        finally:
            os.close(s)
            os.close(d)
        os.rename(partial, dest)
    except BaseException as e:
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and isinstance(e.filename, str) and not e.filename.startswith("/"):
            e.filename = os.path.join(template, e.filename)
        raise
    finally:
        os.fchdir(cwd)
        os.close(cwd)
    stats.seconds = time.monotonic() - t0
    return stats
