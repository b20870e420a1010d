"""The model of a guest's backing tree: inode table, lookup counts, names, and
the immutable-but-unlinkable policy.  It knows nothing of the FUSE protocol;
the adapter in ``fs.py`` only translates.

Identity.  Every inode the kernel knows is a `Node` reaching its backing
inode through an O_PATH fd (closed when it falls off a bounded LRU, reopened
from the inode's file handle), so nothing is ever resolved by path from the root and no
symlink in the guest's tree is ever followed (every open is one component,
O_NOFOLLOW, relative to a directory fd).  FUSE inode numbers are ours: a link
break swaps the backing inode under a Node while the guest keeps its number.

Concurrency.  Everything that changes the tables is plain ``def`` — no
schedule point inside — and runs holding the model's lock (`Lru.lock`,
shared by every tree one daemon serves), so handlers are atomic.  The one
long operation, copying a file's data to break a link, runs in a worker
thread (tasks.py) while the Node's lock is held, so two writers of one
shared file cause one copy.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import breaking, mark
from .idmap import ACL_XATTRS, CAPS_XATTR, IdMap
from .sys import (
    O_PATH_NOFOLLOW,
    RENAME_EXCHANGE,
    chown_fd,
    fallocate,
    link_fd,
    name_to_handle,
    open_by_handle,
    proc_fd,
    renameat2,
    utimens_fd,
)
from .tasks import Lock, to_thread

ROOT = 1
# Inode numbers we hand out when the backing number is taken: above any
# ext4 number, so they never meet a real one in practice (and we check).
_SYNTHETIC_BASE = 1 << 48
# The root again, under a second number: the one the kernel is given for it
# when the mount is published as a bind of the root (daemon.py), so that the
# guest's / is an inode made after INIT, whose ACLs the kernel caches.
ROOT_ALIAS = _SYNTHETIC_BASE - 1

Key = tuple[int, int]  # (st_dev, st_ino) of a backing inode


def key_of(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def killed_by_write(mode: int) -> int:
    """The bits of mode that a write, truncate or chown by someone without
    CAP_FSETID clears, as the kernel does: setuid, and setgid where it
    means setgid (group-executable; without it, it marks mandatory locking)."""
    return mode & (stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0))


class Lru:
    """The bound on cached fds, shared by every tree one daemon serves: a
    daemon serving many guests must stay under one RLIMIT_NOFILE, and the
    guest that is busy now should have the fds, not the idle ones."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.nodes: OrderedDict[int, Node] = OrderedDict()
        # The model's lock: each mount is served by a thread of its own, and
        # evicting one tree's fd must not race with another tree's request.
        self.lock = threading.Lock()


class FdCache:
    """Open fds for one tree's inodes: a node's O_PATH fd (and its data fd)
    is closed when it falls off the end of the LRU, and reopened from its
    file handle when next needed.  The daemon must not depend on
    RLIMIT_NOFILE being larger than the number of inodes the kernel caches."""

    def __init__(self, mount_fd: int, lru: Lru) -> None:
        self.mount_fd = mount_fd  # any fd on the backing filesystem
        self.lru = lru

    @property
    def capacity(self) -> int:
        return self.lru.capacity

    def reopen(self, node: Node) -> int:
        assert node.handle is not None
        return open_by_handle(self.mount_fd, node.handle, O_PATH_NOFOLLOW)

    def admit(self, node: Node) -> None:
        if node.pinned:
            return
        lru = self.lru.nodes
        lru[id(node)] = node
        lru.move_to_end(id(node))
        skipped = 0
        while len(lru) > self.lru.capacity and skipped < len(lru):
            _, old = lru.popitem(last=False)
            if old.busy:
                lru[id(old)] = old
                skipped += 1
                continue
            # The handle is taken only now, on eviction: most nodes never are.
            old.handle = name_to_handle(old._fd, b"") if old.handle is None else old.handle
            if old.handle is None:  # the filesystem cannot export handles
                old.pinned = True
                continue
            old.close_fds()

    def touch(self, node: Node) -> None:
        if id(node) in self.lru.nodes:
            self.lru.nodes.move_to_end(id(node))

    def discard(self, node: Node) -> None:
        self.lru.nodes.pop(id(node), None)


@dataclass(eq=False, slots=True)  # slots: thousands are made per cold directory walk
class Node:
    ino: int
    _fd: int  # O_PATH on the backing inode, or -1 while evicted
    key: Key
    kind: int  # stat.S_IFMT
    marked: bool = False
    lookups: int = 0
    # (parent FUSE ino, name) pairs known to name this inode; used to find
    # the names a link break must replace.  Directories keep none.
    names: set[tuple[int, bytes]] = field(default_factory=set)
    parent: int = ROOT  # directories: the FUSE ino of the one directory holding it
    # Regular files: the fd reads and writes use (the kernel never opens
    # files through us), read-only until the first write.
    io_fd: int = -1
    io_rw: bool = False
    # Directories: the listing readdir offsets index, taken at offset 0 and
    # dropped whenever we change the directory.
    listing: list[tuple[bytes, int]] | None = None  # (name, d_ino)
    _lock: Lock | None = None
    handle: bytes | None = None  # to reopen the inode after eviction
    cache: FdCache | None = None
    busy: bool = False  # a link break holds its fds across an await
    pinned: bool = False  # never evicted: the root, or no handle can be had

    @property
    def lock(self) -> Lock:
        """Serialises link breaks of this inode; made on first need."""
        if self._lock is None:
            self._lock = Lock()
        return self._lock

    @property
    def fd(self) -> int:
        if self._fd < 0:
            assert self.cache is not None
            self._fd = self.cache.reopen(self)
            self.cache.admit(self)
        elif self.cache is not None:
            self.cache.touch(self)
        return self._fd

    def close_io(self) -> None:
        if self.io_fd >= 0:
            os.close(self.io_fd)
            self.io_fd, self.io_rw = -1, False

    def close_fds(self) -> None:
        self.close_io()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class Stats:
    breaks: int = 0  # private copies made
    unmarks: int = 0  # marks cleared on a last link
    temps_removed: int = 0  # leftovers of an interrupted break, at scan


def _walk_dirs(root_fd: int) -> Iterator[tuple[int, os.stat_result, list[os.DirEntry[str]]]]:
    """Every directory below root_fd (an O_PATH fd), never following symlinks.

    Yields (dir fd, its stat, its entries); the fd is valid during the yield.
    """
    stack = [os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)]
    while stack:
        fd = stack.pop()
        try:
            with os.scandir(fd) as it:
                entries = [e for e in it]
            st = os.fstat(fd)
            yield fd, st, entries
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    try:
                        sub = os.open(
                            e.name,
                            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd,
                        )
                    except FileNotFoundError:
                        continue
                    stack.append(sub)
        finally:
            os.close(fd)


class CowTree:
    """A guest's backing tree as the guest sees it."""

    def __init__(self, backing: str, idmap: IdMap | None = None, fd_budget: int = 8192, lru: Lru | None = None) -> None:
        self.idmap = idmap or IdMap()
        self.stats = Stats()
        root_fd = os.open(backing, O_PATH_NOFOLLOW | os.O_DIRECTORY)
        st = os.fstat(root_fd)
        # open_by_handle_at wants a real (not O_PATH) fd on the filesystem
        self.mount_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
        # Each cached node may hold two fds (path and data).
        self.fds = FdCache(self.mount_fd, lru or Lru(max(16, fd_budget // 2)))
        self.dev = st.st_dev
        root = Node(ROOT, root_fd, key_of(st), stat.S_IFDIR, lookups=1, cache=self.fds, pinned=True)
        self.nodes: dict[int, Node] = {ROOT: root, ROOT_ALIAS: root}
        self.by_key: dict[Key, Node] = {root.key: root}
        # Backing keys of regular files with other than one name inside this
        # tree: a marked file's link count as the guest sees it (1 if absent).
        self.tree_links: dict[Key, int] = {}
        # After a break, the copy's key keeps the guest's old number even if
        # the kernel forgets the inode in between.
        self.renumbered: dict[Key, int] = {}
        self.reserved: set[int] = set()
        self._next_synthetic = _SYNTHETIC_BASE
        self.last_file: Node | None = None  # file_held()

    # -- start-up ------------------------------------------------------

    def scan(self) -> None:
        """Count in-tree names of each inode and drop interrupted breaks' temps.

        One pass over directory entries (d_ino from getdents, no stat of
        files), run before the mount is served.
        """
        counts: dict[Key, int] = {}
        for fd, st, entries in _walk_dirs(self.nodes[ROOT].fd):
            for e in entries:
                if breaking.is_temp_name(os.fsencode(e.name)):
                    try:
                        os.unlink(e.name, dir_fd=fd)
                        self.stats.temps_removed += 1
                    except FileNotFoundError:
                        pass
                    continue
                if e.is_file(follow_symlinks=False):
                    k = (st.st_dev, e.inode())
                    counts[k] = counts.get(k, 0) + 1
        self.tree_links = {k: n for k, n in counts.items() if n > 1}

    def destroy(self) -> None:
        """Forget everything (unmount): close every fd we hold."""
        for ino, node in self.nodes.items():
            if ino == ROOT_ALIAS:
                continue  # the root, closed once
            self.fds.discard(node)  # the LRU may be shared with other trees
            node.close_fds()
        self.nodes.clear()
        os.close(self.mount_fd)
        self.by_key.clear()

    # -- the inode table ----------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown inode") from None

    def _number_for(self, key: Key) -> int:
        ino = self.renumbered.get(key)
        if ino is not None and ino not in self.nodes:
            return ino
        ino = key[1]
        if key[0] == self.dev and ino != ROOT and ino not in self.nodes and ino not in self.reserved:
            return ino
        while self._next_synthetic in self.nodes or self._next_synthetic in self.reserved:
            self._next_synthetic += 1
        self._next_synthetic += 1
        return self._next_synthetic - 1

    def _adopt(self, fd: int, st: os.stat_result, fresh: bool = False) -> Node:
        """The Node for the inode behind fd, taking ownership of fd.

        fresh: we just created it, so it carries no mark."""
        k = key_of(st)
        existing = self.by_key.get(k)
        if existing is not None:
            os.close(fd)
            return existing
        kind = stat.S_IFMT(st.st_mode)
        marked = kind == stat.S_IFREG and not fresh and mark.is_marked(fd=fd)
        node = Node(self._number_for(k), fd, k, kind, marked, cache=self.fds)
        self.nodes[node.ino] = node
        self.by_key[k] = node
        self.fds.admit(node)
        return node

    def _child(self, parent: Node, name: bytes, d_ino: int = 0) -> tuple[Node, os.stat_result]:
        """Resolve one name in parent without following it; no lookup counted.

        d_ino: the inode number a listing gave the name.  One we have no node
        for is opened at once, without a stat by name first (a cold readdir
        meets thousands); the fd's own stat decides what it is."""
        if breaking.is_temp_name(name):
            raise OSError(errno.ENOENT, "reserved name")
        node = None
        if not d_ino or (parent.key[0], d_ino) in self.by_key:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            node = self.by_key.get(key_of(st))
        if node is None:
            fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=parent.fd)
            st = os.fstat(fd)  # the identity of what we opened, not of what we stat'ed
            node = self._adopt(fd, st)
        self._named(node, parent, name)
        return node, st

    def _named(self, node: Node, parent: Node, name: bytes) -> None:
        if node.kind == stat.S_IFDIR:
            node.parent = parent.ino
        else:
            node.names.add((parent.ino, name))

    def lookup(self, parent_ino: int, name: bytes) -> tuple[Node, os.stat_result]:
        node, st = self._child(self.node(parent_ino), name)
        node.lookups += 1
        if node.kind == stat.S_IFREG:
            self.last_file = node
        return node, st

    def file_held(self) -> int:
        """The number of a regular file whose inode the kernel holds (the
        last one looked up, until it is forgotten), or 0: the kernel
        answers a retrieve of its pages with a request (fuse.Session.stop)."""
        node = self.last_file
        if node is not None and node.lookups > 0 and self.nodes.get(node.ino) is node:
            return node.ino
        return 0

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is None or node.ino == ROOT:  # (also under ROOT_ALIAS)
            return
        node.lookups -= n
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups <= 0 and node.ino != ROOT:
            del self.nodes[node.ino]
            if self.by_key.get(node.key) is node:
                del self.by_key[node.key]
            self.fds.discard(node)
            node.close_fds()

    def stat(self, node: Node) -> os.stat_result:
        return os.fstat(node.fd)

    def nlink(self, node: Node, st: os.stat_result) -> int:
        """Link counts are the guest's own: names outside the tree don't count."""
        if node.marked:
            return self.tree_links.get(node.key, 1)
        return st.st_nlink

    # -- names --------------------------------------------------------

    def _forget_name(self, parent: Node, name: bytes, st: os.stat_result) -> None:
        """A name of st's inode left the tree (unlink, or renamed over)."""
        k = key_of(st)
        node = self.by_key.get(k)
        if node is not None:
            node.names.discard((parent.ino, name))
        # Count down marked inodes' in-tree names, to 0: a marked inode the
        # guest still holds open but no longer names must never be mistaken
        # for one whose last link is ours.
        if k in self.tree_links or (node is not None and node.marked):
            self.tree_links[k] = self.tree_links.get(k, 1) - 1

    def _stat_or_none(self, parent: Node, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _valid_names(self, node: Node) -> list[tuple[Node, bytes]]:
        out = []
        for pino, name in list(node.names):
            parent = self.nodes.get(pino)
            st = None if parent is None else self._stat_or_none(parent, name)
            if parent is None or st is None or key_of(st) != node.key:
                node.names.discard((pino, name))
                continue
            out.append((parent, name))
        return out

    def _names_by_scan(self, key: Key) -> list[tuple[int, bytes]]:
        """Every (dir fd, name) in the tree naming key; dir fds are the caller's."""
        found: list[tuple[int, bytes]] = []
        for fd, st, entries in _walk_dirs(self.nodes[ROOT].fd):
            hits = [
                os.fsencode(e.name)
                for e in entries
                if (st.st_dev, e.inode()) == key and e.is_file(follow_symlinks=False)
            ]
            if hits:
                keep = os.dup(fd)
                found.extend((keep, h) for h in hits)
        return found

    # -- the iunlink policy ------------------------------------------------

    async def make_private(self, node: Node) -> None:
        """Before any change of content or metadata: break a shared link.

        With no other link outside this tree the mark is just cleared.  Else a
        private copy replaces every name of the inode in this tree (the
        guest's own hard-link group stays one file), and the Node, its open
        handles and its inode number move to the copy.
        """
        if not node.marked:
            return
        async with node.lock:
            if not node.marked:  # another writer broke it while we waited
                return
            st = os.fstat(node.fd)
            in_tree = self.tree_links.get(node.key, 1)
            if in_tree > 0 and st.st_nlink <= in_tree:
                mark.clear_mark(fd=node.fd)
                node.marked = False
                self.tree_links.pop(node.key, None)
                self.stats.unmarks += 1
                return
            await self._break(node, in_tree)

    async def _break(self, node: Node, in_tree: int) -> None:
        node.busy = True  # its fd is used across the await below
        try:
            await self._break_busy(node, in_tree)
        finally:
            node.busy = False

    async def _break_busy(self, node: Node, in_tree: int) -> None:
        known = self._valid_names(node)
        # Own every directory fd used across the await below (dups: the
        # parents' fds could be evicted meanwhile).  Names never looked up are
        # found by a scan (rare: a hard-link group).
        if len(known) >= in_tree:
            targets = [(os.dup(p.fd), n) for p, n in known]
        else:
            targets = self._names_by_scan(node.key)
        owned = [fd for fd, _ in targets]
        try:
            # An open but unlinked file has no name: the copy stays anonymous.
            where = targets[0][0] if targets else self.nodes[ROOT].fd  # the root is pinned
            tmp = await to_thread(breaking.make_copy, where, node.fd)
            try:
                for dir_fd, name in targets:
                    breaking.install(tmp, dir_fd, name)
                new_fd = os.open(proc_fd(tmp), os.O_PATH | os.O_CLOEXEC)  # follows the magic link to the copy
            finally:
                os.close(tmp)
        finally:
            for fd in set(owned):
                os.close(fd)
        self._rebind(node, new_fd)
        self.stats.breaks += 1

    def _rebind(self, node: Node, new_fd: int) -> None:
        old_key = node.key
        node.close_fds()  # reads and writes move to the copy
        node._fd = new_fd
        node.handle = None
        node.key = key_of(os.fstat(new_fd))
        self.fds.admit(node)
        node.marked = False
        if self.by_key.get(old_key) is node:
            del self.by_key[old_key]
        self.by_key[node.key] = node
        self.tree_links.pop(old_key, None)
        self.renumbered[node.key] = node.ino
        self.reserved.add(node.ino)

    # -- operations -----------------------------------------------------------

    def _creator(self, uid: int, gid: int) -> tuple[int, int]:
        return (
            self.idmap.uid_in(uid, errno.EOVERFLOW),
            self.idmap.gid_in(gid, errno.EOVERFLOW),
        )

    def _own_new(self, parent: Node, fd: int, uid: int, gid: int, mode: int) -> None:
        """Give a just-created inode to its creator (the daemon made it as root)."""
        buid, bgid = self._creator(uid, gid)
        pst = os.fstat(parent.fd)
        if pst.st_mode & stat.S_ISGID:
            bgid = -1  # inherited from a setgid directory, as the kernel does
        chown_fd(fd, buid, bgid)
        # chown clears set-id bits even for root; put back what was asked for.
        if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(mode):
            os.chmod(proc_fd(fd), stat.S_IMODE(mode))

    def _check_new_name(self, name: bytes) -> None:
        if breaking.is_temp_name(name):
            raise OSError(errno.EPERM, "name reserved by cowfs")

    def _finish_create(self, parent: Node, name: bytes, uid: int, gid: int, mode: int) -> tuple[Node, os.stat_result]:
        fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=parent.fd)
        try:
            self._own_new(parent, fd, uid, gid, mode)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            if stat.S_ISDIR(mode):
                os.rmdir(name, dir_fd=parent.fd)
            else:
                os.unlink(name, dir_fd=parent.fd)
            raise
        node = self._adopt(fd, st, fresh=True)
        self._named(node, parent, name)
        parent.listing = None
        node.lookups += 1
        return node, st

    def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int, umask: int
    ) -> tuple[Node, os.stat_result]:
        parent = self.node(parent_ino)
        self._check_new_name(name)
        self._creator(uid, gid)
        old = os.umask(umask)
        try:
            os.mknod(name, mode, rdev, dir_fd=parent.fd)
        finally:
            os.umask(old)
        return self._finish_create(parent, name, uid, gid, mode)

    def mkdir(
        self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, umask: int
    ) -> tuple[Node, os.stat_result]:
        parent = self.node(parent_ino)
        self._check_new_name(name)
        self._creator(uid, gid)
        old = os.umask(umask)
        try:
            os.mkdir(name, mode, dir_fd=parent.fd)
        finally:
            os.umask(old)
        return self._finish_create(parent, name, uid, gid, stat.S_IFDIR | mode)

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> tuple[Node, os.stat_result]:
        parent = self.node(parent_ino)
        self._check_new_name(name)
        self._creator(uid, gid)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._finish_create(parent, name, uid, gid, stat.S_IFLNK | 0o777)

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        # readlinkat(fd, "") reads an O_PATH symlink fd itself.
        return os.readlink(b"", dir_fd=node.fd)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        parent = self.node(parent_ino)
        if breaking.is_temp_name(name):
            raise OSError(errno.ENOENT, "reserved name")
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        os.unlink(name, dir_fd=parent.fd)
        parent.listing = None
        self._forget_name(parent, name, st)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent = self.node(parent_ino)
        if breaking.is_temp_name(name):
            raise OSError(errno.ENOENT, "reserved name")
        os.rmdir(name, dir_fd=parent.fd)
        parent.listing = None

    def rename(self, old_ino: int, old: bytes, new_ino: int, new: bytes, flags: int) -> None:
        src_dir, dst_dir = self.node(old_ino), self.node(new_ino)
        if breaking.is_temp_name(old):
            raise OSError(errno.ENOENT, "reserved name")
        self._check_new_name(new)
        src_st = os.stat(old, dir_fd=src_dir.fd, follow_symlinks=False)
        dst_st = self._stat_or_none(dst_dir, new)
        renameat2(src_dir.fd, old, dst_dir.fd, new, flags)
        src_dir.listing = dst_dir.listing = None
        moved = self.by_key.get(key_of(src_st))
        if flags & RENAME_EXCHANGE:  # both names stay, swapped
            other = None if dst_st is None else self.by_key.get(key_of(dst_st))
            for n, frm, to, to_name in (
                (moved, (src_dir.ino, old), dst_dir, new),
                (other, (dst_dir.ino, new), src_dir, old),
            ):
                if n is not None:
                    n.names.discard(frm)
                    self._named(n, to, to_name)
            return
        if dst_st is not None and key_of(dst_st) != key_of(src_st):
            self._forget_name(dst_dir, new, dst_st)
        if moved is not None:
            moved.names.discard((src_dir.ino, old))
            self._named(moved, dst_dir, new)

    async def link(self, ino: int, parent_ino: int, name: bytes) -> tuple[Node, os.stat_result]:
        node, parent = self.node(ino), self.node(parent_ino)
        self._check_new_name(name)
        await self.make_private(node)
        link_fd(node.fd, parent.fd, name)
        parent.listing = None
        node.names.add((parent.ino, name))
        node.lookups += 1
        return node, os.fstat(node.fd)

    async def setattr(
        self,
        ino: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        kill_suidgid: bool = False,
    ) -> os.stat_result:
        """kill_suidgid: the caller may not keep setuid/setgid across this
        truncate or chown (the kernel decides; our own calls as root would
        keep them)."""
        node = self.node(ino)
        buid = None if uid is None else self.idmap.uid_in(uid)
        bgid = None if gid is None else self.idmap.gid_in(gid)
        if size is None and mode is None and buid is None and bgid is None:
            # Under writeback caching the kernel flushes the times it keeps
            # (after a rename or unlink it sends back an unchanged mtime with
            # its ctime).  Setting a time to what it is changes nothing, so
            # it must not break a link.
            cur = os.fstat(node.fd)
            if atime_ns in (None, cur.st_atime_ns) and mtime_ns in (None, cur.st_mtime_ns):
                return cur
        await self.make_private(node)
        if size is not None:
            os.ftruncate(self.io(node, True), size)
        if buid is not None or bgid is not None:
            chown_fd(node.fd, -1 if buid is None else buid, -1 if bgid is None else bgid)
        if mode is not None and node.kind != stat.S_IFLNK:
            os.chmod(proc_fd(node.fd), stat.S_IMODE(mode))
        elif kill_suidgid:
            self._kill_suidgid(node)
        if atime_ns is not None or mtime_ns is not None:
            utimens_fd(node.fd, atime_ns, mtime_ns)
        return os.fstat(node.fd)

    @staticmethod
    def _kill_suidgid(node: Node) -> None:
        """What the kernel does to a file written, truncated or given away
        by someone without CAP_FSETID."""
        if node.kind != stat.S_IFREG:
            return
        mode = os.fstat(node.fd).st_mode
        kill = killed_by_write(mode)
        if kill:
            os.chmod(proc_fd(node.fd), stat.S_IMODE(mode) & ~kill)

    # -- file data ------------------------------------------------------

    def io(self, node: Node, write: bool) -> int:
        """The fd for node's data.  Read-only until a write needs more: an
        O_RDWR open of a running executable would fail with ETXTBSY."""
        path_fd = node.fd  # reopens an evicted node (and its io fd with it)
        if node.io_fd >= 0 and (node.io_rw or not write):
            return node.io_fd
        fd = os.open(proc_fd(path_fd), (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        node.close_io()
        node.io_fd, node.io_rw = fd, write
        return fd

    def read(self, ino: int, off: int, size: int) -> bytes:
        return os.pread(self.io(self.node(ino), False), size, off)

    async def write(self, ino: int, off: int, data: bytes | memoryview, kill_suidgid: bool = False) -> int:
        node = self.node(ino)
        await self.make_private(node)
        if kill_suidgid:
            self._kill_suidgid(node)
        return os.pwrite(self.io(node, True), data, off)

    async def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        node = self.node(ino)
        await self.make_private(node)
        fallocate(self.io(node, True), mode, off, length)

    def fsync(self, ino: int, datasync: bool) -> None:
        node = self.node(ino)
        if node.kind == stat.S_IFREG:
            fd = self.io(node, False)
            (os.fdatasync if datasync else os.fsync)(fd)
            return
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- directories ----------------------------------------------------

    def readdir(self, ino: int, offset: int) -> Iterator[tuple[int, bytes, Node, os.stat_result, bool]]:
        """Entries from offset on, with the offset of the next, and whether
        the kernel counts a lookup for it (not for "." and ".."); the caller
        does the counting for what it hands out."""
        node = self.node(ino)
        if offset == 0 or node.listing is None:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
            try:
                with os.scandir(fd) as it:
                    names = [(os.fsencode(e.name), e.inode()) for e in it]
            finally:
                os.close(fd)
            node.listing = [(b".", 0), (b"..", 0)] + [n for n in names if not breaking.is_temp_name(n[0])]
        listing = node.listing
        for i in range(offset, len(listing)):
            name, d_ino = listing[i]
            if i < 2:
                other = node if i == 0 else self.nodes.get(node.parent, node)
                yield i + 1, name, other, os.fstat(other.fd), False
                continue
            try:
                child, st = self._child(node, name, d_ino)
            except FileNotFoundError:  # removed since the listing was taken
                continue
            yield i + 1, name, child, st, True

    def drop_if_unused(self, node: Node) -> None:
        self._maybe_drop(node)

    # -- xattrs ---------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self.node(ino)
        if mark.is_internal_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute")
        value = os.getxattr(proc_fd(node.fd), name)
        if name in ACL_XATTRS:
            value = self.idmap.acl(value, inbound=False)
        elif name == CAPS_XATTR:
            value = self.idmap.fscaps(value, inbound=False)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        return [os.fsencode(n) for n in os.listxattr(proc_fd(node.fd)) if not mark.is_internal_xattr(n)]

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        node = self.node(ino)
        if mark.is_internal_xattr(name):
            raise OSError(errno.EPERM, "attribute reserved by cowfs")
        if name in ACL_XATTRS:
            value = self.idmap.acl(value, inbound=True)
        elif name == CAPS_XATTR:
            value = self.idmap.fscaps(value, inbound=True)
        await self.make_private(node)
        os.setxattr(proc_fd(node.fd), name, value, flags)

    async def removexattr(self, ino: int, name: bytes) -> None:
        node = self.node(ino)
        if mark.is_internal_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute")
        await self.make_private(node)
        os.removexattr(proc_fd(node.fd), name)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.nodes[ROOT].fd)
