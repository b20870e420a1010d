"""The FUSE adapter: decodes requests for the model and encodes its answers.

Errors are mapped here and only here: an OSError from the model becomes the
errno of the reply (in fuse.Session); anything else is a bug and stays loud.

What the kernel is told, and why:
- entries, negative entries and attributes are valid for a day: cowfs is the
  only writer of the backing tree while mounted, and every change it makes
  is a reply that updates the kernel's cache;
- OPENDIR and FLUSH are answered ENOSYS, so the kernel stops
  sending them and keeps directory listings cached itself; reads and writes
  carry the inode, and the model keeps one fd per inode;
- OPEN and CREATE too, unless the kernel takes passthrough: then shared
  files are read through the shared inode's own pages, private files are
  read and written by the kernel itself (shared.py), and CREATE saves a
  request per new file (else MKNOD, then OPEN);
- we clear setuid/setgid where the kernel's flags say to (write, truncate,
  chown: HANDLE_KILLPRIV_V2), and the backing filesystem drops file
  capabilities on the same calls.  The kernel then stops asking for
  security.capability before every write() and refreshing attributes
  before every chown: two requests a file when tar extracts;
- a link therefore breaks at the first change (write, truncate, chmod, ...),
  not at a write-open that writes nothing: nothing the guest can observe
  differs, and no copy is made that nothing needed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable

from . import fuse
from .fuse import Request
from .model import ROOT, ROOT_ALIAS, CowTree, Node
from .shared import FH_UNTRACKED, SharedCache

log = logging.getLogger("cowfs")

_NEGATIVE = fuse.pack_entry(0, bytes(fuse.ATTR.size))


class CowFS:
    def __init__(self, tree: CowTree) -> None:
        self.tree = tree
        self.shared: SharedCache | None = None  # once the kernel took passthrough
        self.truncating: dict[int, int] = {}  # node: truncates under way (slow requests)
        # While the mount is published (daemon.py): the name whose LOOKUP in
        # the root answers the root itself, as ROOT_ALIAS.  Once; after that
        # it is the guest's name like any other.
        self.publishing: bytes | None = None

    # -- encoding -------------------------------------------------------

    def _attr(self, node: Node, st: os.stat_result) -> bytes:
        idmap = self.tree.idmap
        return fuse.pack_attr(
            node.ino, st, self.tree.nlink(node, st), idmap.uid_out(st.st_uid), idmap.gid_out(st.st_gid)
        )

    def _entry(self, node: Node, st: os.stat_result) -> bytes:
        return fuse.pack_entry(node.ino, self._attr(node, st))

    @staticmethod
    def _dirent(node: Node, st: os.stat_result, name: bytes, next_off: int) -> bytes:
        """A struct fuse_dirent, padded to 8 bytes."""
        head = fuse.DIRENT_HEAD.pack(node.ino, next_off, len(name), stat.S_IFMT(st.st_mode) >> 12)
        return head + name + bytes(fuse.pad8(len(head) + len(name)) - len(head) - len(name))

    # -- the tables the session dispatches on ----------------------------

    def took(self, flags: int, fuse_fd: int) -> None:
        """INIT's outcome."""
        if flags & fuse.PASSTHROUGH:
            self.shared = SharedCache(self.tree, fuse_fd)
        log.info("page cache: %s", "shared" if self.shared else "private")

    def handlers(self) -> dict[int, fuse.Handler]:
        return {
            fuse.LOOKUP: self.lookup,
            fuse.FORGET: self.forget,
            fuse.BATCH_FORGET: self.batch_forget,
            fuse.GETATTR: self.getattr,
            fuse.SETATTR: self._sync(self.setattr),
            fuse.READLINK: self.readlink,
            fuse.SYMLINK: self.symlink,
            fuse.MKNOD: self.mknod,
            fuse.MKDIR: self.mkdir,
            fuse.UNLINK: self.unlink,
            fuse.RMDIR: self.rmdir,
            fuse.RENAME: self.rename,
            fuse.RENAME2: self.rename2,
            fuse.LINK: self._sync(self.link),
            fuse.OPEN: self.open,
            fuse.OPENDIR: self.enosys,
            fuse.CREATE: self.create,
            fuse.FLUSH: self.enosys,
            fuse.RELEASE: self.release,
            fuse.RELEASEDIR: self.ok,
            fuse.READ: self.read,
            fuse.WRITE: self._sync(self.write),
            fuse.STATFS: self.statfs,
            fuse.FSYNC: self.fsync,
            fuse.FSYNCDIR: self.fsync,
            fuse.SETXATTR: self._sync(self.setxattr),
            fuse.GETXATTR: self.getxattr,
            fuse.LISTXATTR: self.listxattr,
            fuse.REMOVEXATTR: self._sync(self.removexattr),
            fuse.ACCESS: self.ok,
            fuse.FALLOCATE: self._sync(self.fallocate),
            fuse.READDIRPLUS: self.readdirplus,
            fuse.READDIR: self.readdir,
            fuse.INTERRUPT: self.ok,
        }

    def slow(self) -> dict[int, tuple[Callable[[Request, memoryview], bool], fuse.AsyncHandler]]:
        """Requests that may break a link run as tasks, but only when they
        will: the node is marked.  Everything else is answered inline."""
        marked = self._target_marked
        linked = self._link_source_marked
        return {
            fuse.SETATTR: (self._setattr_marked, self._counted_setattr),
            fuse.WRITE: (marked, self.write),
            fuse.SETXATTR: (marked, self.setxattr),
            fuse.REMOVEXATTR: (marked, self.removexattr),
            fuse.FALLOCATE: (marked, self.fallocate),
            fuse.LINK: (linked, self.link),
        }

    def _target_marked(self, req: Request, body: memoryview) -> bool:
        node = self.tree.nodes.get(req.nodeid)
        return node is not None and node.marked

    def _setattr_marked(self, req: Request, body: memoryview) -> bool:
        """Also: a truncate refused or counted here, in request order, so that
        no open made while it runs can be passthrough (shared.py)."""
        if not self._target_marked(req, body):
            return False
        if fuse.SETATTR_IN.unpack_from(body)[0] & fuse.FATTR_SIZE:
            if self.shared is not None and self.shared.busy(req.nodeid):
                return False  # refused inline
            self.truncating[req.nodeid] = self.truncating.get(req.nodeid, 0) + 1
        return True

    async def _counted_setattr(self, req: Request, body: memoryview) -> bytes:
        try:
            return await self.setattr(req, body)
        finally:
            if fuse.SETATTR_IN.unpack_from(body)[0] & fuse.FATTR_SIZE:
                n = self.truncating.pop(req.nodeid) - 1
                if n:
                    self.truncating[req.nodeid] = n

    def _link_source_marked(self, req: Request, body: memoryview) -> bool:
        (old,) = fuse.LINK_IN.unpack_from(body)
        node = self.tree.nodes.get(old)
        return node is not None and node.marked

    @staticmethod
    def _sync(fn: Callable[[Request, memoryview], Awaitable[bytes | None]]) -> fuse.Handler:
        """Run a coroutine that will not suspend (its node is not marked)."""

        def run(req: Request, body: memoryview) -> bytes | None:
            coro = fn(req, body)
            try:
                coro.send(None)  # type: ignore[attr-defined]
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            coro.close()  # type: ignore[attr-defined]
            raise RuntimeError(f"opcode {req.opcode} suspended on an unmarked inode")

        return run

    # -- handlers -------------------------------------------------------

    def enosys(self, req: Request, body: memoryview) -> bytes:
        raise OSError(errno.ENOSYS, "not used")

    def ok(self, req: Request, body: memoryview) -> None:
        return None

    def lookup(self, req: Request, body: memoryview) -> bytes:
        name, _ = fuse.cstr(body)
        if name == self.publishing and req.nodeid == ROOT:
            self.publishing = None
            root = self.tree.node(ROOT)
            return fuse.pack_entry(ROOT_ALIAS, self._attr(root, self.tree.stat(root)))
        try:
            node, st = self.tree.lookup(req.nodeid, name)
        except FileNotFoundError:
            return _NEGATIVE
        return self._entry(node, st)

    def forget(self, req: Request, body: memoryview) -> None:
        (n,) = fuse.FORGET_IN.unpack_from(body)
        self._forget(req.nodeid, n)

    def _forget(self, ino: int, n: int) -> None:
        self.tree.forget(ino, n)
        if self.shared is not None and ino not in self.tree.nodes:
            self.shared.forget(ino)

    def batch_forget(self, req: Request, body: memoryview) -> None:
        count, _ = fuse.BATCH_FORGET_IN.unpack_from(body)
        off = fuse.BATCH_FORGET_IN.size
        for _ in range(count):
            ino, n = fuse.FORGET_ONE.unpack_from(body, off)
            off += fuse.FORGET_ONE.size
            self._forget(ino, n)

    def getattr(self, req: Request, body: memoryview) -> bytes:
        node = self.tree.node(req.nodeid)
        return fuse.pack_attr_out(self._attr(node, self.tree.stat(node)))

    async def setattr(self, req: Request, body: memoryview) -> bytes:
        (valid, _, _fh, size, _lo, atime, mtime, _ctime, atimens, mtimens, _cns, mode, _u4, uid, gid, _u5) = (
            fuse.SETATTR_IN.unpack_from(body)
        )
        if valid & fuse.FATTR_SIZE and req.nodeid not in self.truncating and self.shared is not None:
            self.shared.refuse_change(req.nodeid)  # (a slow one was checked at dispatch)
        now = time.time_ns() if valid & (fuse.FATTR_ATIME_NOW | fuse.FATTR_MTIME_NOW) else 0
        atime_ns = mtime_ns = None
        if valid & fuse.FATTR_ATIME_NOW:
            atime_ns = now
        elif valid & fuse.FATTR_ATIME:
            atime_ns = atime * 1_000_000_000 + atimens
        if valid & fuse.FATTR_MTIME_NOW:
            mtime_ns = now
        elif valid & fuse.FATTR_MTIME:
            mtime_ns = mtime * 1_000_000_000 + mtimens
        st = await self.tree.setattr(
            req.nodeid,
            size=size if valid & fuse.FATTR_SIZE else None,
            mode=mode if valid & fuse.FATTR_MODE else None,
            uid=uid if valid & fuse.FATTR_UID else None,
            gid=gid if valid & fuse.FATTR_GID else None,
            atime_ns=atime_ns,
            mtime_ns=mtime_ns,
            kill_suidgid=bool(valid & fuse.FATTR_KILL_SUIDGID),
        )
        return fuse.pack_attr_out(self._attr(self.tree.node(req.nodeid), st))

    def readlink(self, req: Request, body: memoryview) -> bytes:
        return self.tree.readlink(req.nodeid)

    def symlink(self, req: Request, body: memoryview) -> bytes:
        name, off = fuse.cstr(body)
        target, _ = fuse.cstr(body, off)
        return self._entry(*self.tree.symlink(req.nodeid, name, target, req.uid, req.gid))

    def mknod(self, req: Request, body: memoryview) -> bytes:
        mode, rdev, umask, _ = fuse.MKNOD_IN.unpack_from(body)
        name, _ = fuse.cstr(body, fuse.MKNOD_IN.size)
        return self._entry(*self.tree.mknod(req.nodeid, name, mode, rdev, req.uid, req.gid, umask))

    def mkdir(self, req: Request, body: memoryview) -> bytes:
        mode, umask = fuse.MKDIR_IN.unpack_from(body)
        name, _ = fuse.cstr(body, fuse.MKDIR_IN.size)
        return self._entry(*self.tree.mkdir(req.nodeid, name, mode, req.uid, req.gid, umask))

    def unlink(self, req: Request, body: memoryview) -> None:
        self.tree.unlink(req.nodeid, fuse.cstr(body)[0])

    def rmdir(self, req: Request, body: memoryview) -> None:
        self.tree.rmdir(req.nodeid, fuse.cstr(body)[0])

    def rename(self, req: Request, body: memoryview) -> None:
        (newdir,) = fuse.RENAME_IN.unpack_from(body)
        old, off = fuse.cstr(body, fuse.RENAME_IN.size)
        new, _ = fuse.cstr(body, off)
        self.tree.rename(req.nodeid, old, newdir, new, 0)

    def rename2(self, req: Request, body: memoryview) -> None:
        newdir, flags, _ = fuse.RENAME2_IN.unpack_from(body)
        old, off = fuse.cstr(body, fuse.RENAME2_IN.size)
        new, _ = fuse.cstr(body, off)
        self.tree.rename(req.nodeid, old, newdir, new, flags)

    async def link(self, req: Request, body: memoryview) -> bytes:
        (old,) = fuse.LINK_IN.unpack_from(body)
        name, _ = fuse.cstr(body, fuse.LINK_IN.size)
        return self._entry(*await self.tree.link(old, req.nodeid, name))

    def open(self, req: Request, body: memoryview) -> bytes:
        """Sent only when the kernel took passthrough: else the first OPEN's
        ENOSYS stops them."""
        if self.shared is None:
            raise OSError(errno.ENOSYS, "not used")
        flags, _ = fuse.OPEN_IN.unpack_from(body)
        node = self.tree.node(req.nodeid)
        fh, backing = self.shared.open(node, flags, req.nodeid in self.truncating)
        return self._opened(node, fh, backing)

    @staticmethod
    def _opened(node: Node, fh: int, backing: int) -> bytes:
        if backing:
            return fuse.OPEN_OUT.pack(fh, fuse.FOPEN_PASSTHROUGH | fuse.FOPEN_NOFLUSH, backing)
        # A private file's pages may be stale, written passthrough since
        # they were cached, unless passthrough is off (untracked opens).
        keep = fuse.FOPEN_KEEP_CACHE if node.marked or fh == FH_UNTRACKED else 0
        return fuse.OPEN_OUT.pack(fh, keep | fuse.FOPEN_NOFLUSH, 0)

    def create(self, req: Request, body: memoryview) -> bytes:
        """With opens sent: one request instead of MKNOD and OPEN.  (Else
        ENOSYS, and the kernel makes files with MKNOD alone.)"""
        if self.shared is None:
            raise OSError(errno.ENOSYS, "not used")
        flags, mode, umask, _ = fuse.CREATE_IN.unpack_from(body)
        name, _ = fuse.cstr(body, fuse.CREATE_IN.size)
        node, st = self.tree.mknod(req.nodeid, name, stat.S_IFREG | stat.S_IMODE(mode), 0, req.uid, req.gid, umask)
        fh, backing = self.shared.open(node, flags, False)
        return self._entry(node, st) + self._opened(node, fh, backing)

    def release(self, req: Request, body: memoryview) -> None:
        if self.shared is not None:
            fh, *_ = fuse.RELEASE_IN.unpack_from(body)
            self.shared.release(req.nodeid, fh)

    def read(self, req: Request, body: memoryview) -> bytes:
        _fh, off, size, *_ = fuse.READ_IN.unpack_from(body)
        return self.tree.read(req.nodeid, off, size)

    async def write(self, req: Request, body: memoryview) -> bytes:
        _fh, off, size, write_flags, *_ = fuse.WRITE_IN.unpack_from(body)
        data = body[fuse.WRITE_IN.size : fuse.WRITE_IN.size + size]
        written = await self.tree.write(req.nodeid, off, data, bool(write_flags & fuse.WRITE_KILL_SUIDGID))
        return fuse.WRITE_OUT.pack(written, 0)

    async def fallocate(self, req: Request, body: memoryview) -> None:
        _fh, off, length, mode, _ = fuse.FALLOCATE_IN.unpack_from(body)
        await self.tree.fallocate(req.nodeid, mode, off, length)

    def statfs(self, req: Request, body: memoryview) -> bytes:
        sv = self.tree.statfs()
        return fuse.STATFS_OUT.pack(
            sv.f_blocks,
            sv.f_bfree,
            sv.f_bavail,
            sv.f_files,
            sv.f_ffree,
            sv.f_bsize,
            sv.f_namemax,
            sv.f_frsize,
            0,
            *([0] * 6),
        )

    def fsync(self, req: Request, body: memoryview) -> None:
        _fh, flags, _ = fuse.FSYNC_IN.unpack_from(body)
        self.tree.fsync(req.nodeid, bool(flags & 1))

    async def setxattr(self, req: Request, body: memoryview) -> None:
        size, flags = fuse.SETXATTR_IN.unpack_from(body)
        name, off = fuse.cstr(body, fuse.SETXATTR_IN.size)
        await self.tree.setxattr(req.nodeid, name, body[off : off + size].tobytes(), flags)

    @staticmethod
    def _sized(value: bytes, body: memoryview) -> bytes:
        size, _ = fuse.GETXATTR_IN.unpack_from(body)
        if size == 0:
            return fuse.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    def getxattr(self, req: Request, body: memoryview) -> bytes:
        name, _ = fuse.cstr(body, fuse.GETXATTR_IN.size)
        return self._sized(self.tree.getxattr(req.nodeid, name), body)

    def listxattr(self, req: Request, body: memoryview) -> bytes:
        return self._sized(b"".join(n + b"\0" for n in self.tree.listxattr(req.nodeid)), body)

    async def removexattr(self, req: Request, body: memoryview) -> None:
        await self.tree.removexattr(req.nodeid, fuse.cstr(body)[0])

    def readdirplus(self, req: Request, body: memoryview) -> bytes:
        _fh, offset, size, *_ = fuse.READ_IN.unpack_from(body)
        out = bytearray()
        for next_off, name, node, st, counted in self.tree.readdir(req.nodeid, offset):
            dirent = self._dirent(node, st, name, next_off)
            if len(out) + fuse.ENTRY_HEAD.size + fuse.ATTR.size + len(dirent) > size:
                self.tree.drop_if_unused(node)
                break
            out += self._entry(node, st)
            out += dirent
            if counted:
                node.lookups += 1  # the kernel counts a lookup for each entry
        return bytes(out)

    def readdir(self, req: Request, body: memoryview) -> bytes:
        _fh, offset, size, *_ = fuse.READ_IN.unpack_from(body)
        out = bytearray()
        for next_off, name, node, st, _counted in self.tree.readdir(req.nodeid, offset):
            dirent = self._dirent(node, st, name, next_off)
            self.tree.drop_if_unused(node)  # plain entries count no lookup
            if len(out) + len(dirent) > size:
                break
            out += dirent
        return bytes(out)


INIT_FLAGS = (
    fuse.ASYNC_READ
    | fuse.BIG_WRITES
    | fuse.DONT_MASK
    | fuse.DO_READDIRPLUS
    | fuse.ASYNC_DIO
    | fuse.WRITEBACK_CACHE
    | fuse.PARALLEL_DIROPS
    | fuse.POSIX_ACL
    | fuse.ABORT_ERROR
    | fuse.MAX_PAGES
    | fuse.CACHE_SYMLINKS
    | fuse.HANDLE_KILLPRIV_V2
    | fuse.PASSTHROUGH  # if the kernel takes it, instead of WRITEBACK_CACHE
)
