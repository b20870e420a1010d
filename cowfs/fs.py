"""The pyfuse3 adapter: translates FUSE requests to the model and back.

Errors are mapped here and only here: an OSError from the model becomes
FUSEError(errno); anything else is a bug and stays loud.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from .model import CowTree, Node

log = logging.getLogger("cowfs")

# The daemon is the only writer of the backing tree while mounted, so the
# kernel may cache entries, negative entries and attributes for as long as
# it likes: every change goes through us and our replies update its cache.
TIMEOUT = 86400.0

P = ParamSpec("P")
R = TypeVar("R")


def _fuse_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except OSError as e:
            if e.errno is None:
                raise
            raise pyfuse3.FUSEError(e.errno) from None

    return wrapper


class CowOperations(pyfuse3.Operations):
    supports_dot_lookup = False  # no ".." lookups: we are not NFS-exported
    enable_writeback_cache = True
    enable_acl = True

    def __init__(self, tree: CowTree) -> None:
        super().__init__()
        self.tree = tree
        tree.writeback = self.enable_writeback_cache

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = self.tree.nlink(node, st)
        idmap = self.tree.idmap
        a.st_uid = idmap.uid_out(st.st_uid)
        a.st_gid = idmap.gid_out(st.st_gid)
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def stacktrace(self) -> None:
        """pyfuse3 dumps stacks on a magic setxattr; a guest must not spam our log."""

    # -- lookups ------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            node, st = self.tree.lookup(parent_inode, name)
        except FileNotFoundError:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = TIMEOUT
            return neg
        return self._attrs(node, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            try:
                self.tree.forget(ino, n)
            except OSError:  # forget never raises; a close failing is only logged
                log.exception("forget(%d) failed", ino)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.tree.node(inode)
        return self._attrs(node, self.tree.stat(node))

    @_fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        log.debug(
            "setattr %d size=%s mode=%s uid=%s gid=%s atime=%s mtime=%s ctime=%s fh=%s",
            inode,
            fields.update_size,
            fields.update_mode,
            fields.update_uid,
            fields.update_gid,
            fields.update_atime,
            fields.update_mtime,
            fields.update_ctime,
            fh,
        )
        st = await self.tree.setattr(
            inode,
            fh,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._attrs(self.tree.node(inode), st)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.tree.readlink(inode)

    # -- namespace changes --------------------------------------------------

    @_fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node, st = self.tree.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid, ctx.umask)
        return self._attrs(node, st)

    @_fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node, st = self.tree.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid, ctx.umask)
        return self._attrs(node, st)

    @_fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node, st = self.tree.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return self._attrs(node, st)

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.tree.unlink(parent_inode, name)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.tree.rmdir(parent_inode, name)

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self.tree.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node, st = await self.tree.link(inode, new_parent_inode, new_name)
        return self._attrs(node, st)

    # -- files ------------------------------------------------------------

    def _info(self, fh: int) -> pyfuse3.FileInfo:
        # keep_cache: we are the only writer, so the page cache stays valid
        # from one open to the next.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return self._info(await self.tree.open(inode, flags))

    @_fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, node, st = self.tree.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid, ctx.umask)
        return self._info(fh), self._attrs(node, st)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.tree.file(fh).fd, size, off)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self.tree.file(fh).fd, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    @_fuse_errors
    async def release(self, fh: int) -> None:
        self.tree.release(fh)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self.tree.file(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    # -- directories ----------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.tree.opendir(inode)

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for next_id, name, node, st, counted in self.tree.dir_entries(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._attrs(node, st), next_id):
                self.tree.drop_if_unused(node)
                return
            if counted:
                node.lookups += 1  # readdirplus entries count as lookups

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.tree.releasedir(fh)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.tree.fsyncdir(fh)

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self.tree.statfs()
        out = pyfuse3.StatvfsData()
        for f in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, f, getattr(sv, f))
        return out

    # -- xattrs ---------------------------------------------------------

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.tree.getxattr(inode, name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.tree.listxattr(inode)

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.tree.setxattr(inode, name, value, 0)

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.tree.removexattr(inode, name)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel has already checked
