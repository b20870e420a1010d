"""One page cache for shared files: FUSE passthrough (Linux 6.9+).

A FUSE mount caches file pages in its own inodes, so every guest held its
own copy of each template file it read: ~19 MiB for a booted Debian
guest, the same libc and systemd pages again in every guest.  Here a
read-only open of a marked (shared) file is handed to the kernel with the
shared inode as its backing file: reads and mmap, exec and shared
libraries included, use the backing filesystem's pages, one copy for the
template and all its guests (VServer's "one page cache for shared
libraries"), and no READ request reaches us.

The price: the kernel must send OPEN (and RELEASE) for every open, since
answering OPEN with ENOSYS, which stops it, is for the whole connection;
and it refuses passthrough alongside writeback caching.

The kernel's rules (fs/fuse/iomode.c): an inode is open either cached or
passthrough, never both at once, and all its passthrough opens share one
backing file.  Hence:
- a read-only open of a marked file of 32 KiB or more is passthrough,
  unless the inode is open cached (someone has it open for writing: then
  cached);
- any other open is cached, unless the inode is open passthrough.  Then a
  read-only open shares the backing file (a chmod or chown broke the link
  meanwhile: the content is still the same), and an open for writing or a
  truncate is refused with ETXTBSY until those readers close: as for a
  running executable.  The content a passthrough reader sees can therefore
  never differ from the guest's file.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from . import sys
from .model import CowTree, Node

log = logging.getLogger("cowfs")

# Smaller files are cached by each mount: they save little (a page or a
# few each) and are the ones written in place (configuration), which a
# passthrough reader would hold up (ETXTBSY, below).
SHARED_MIN = 32 * 1024

# File handles in OPEN replies: RELEASE tells which kind of open ended.
# Most opens are of private files that were never open passthrough: those
# need no bookkeeping, and the serving loop answers their RELEASE before
# decoding it (fuse.py).
FH_UNTRACKED, FH_CACHED, FH_PASSTHROUGH = 0, 1, 2


def _held() -> OSError:
    return OSError(errno.ETXTBSY, "open for reading through the shared inode")


@dataclass
class _Opens:
    node: Node  # a node number can be reused once the kernel forgets it
    cached: int = 0
    passthrough: int = 0
    backing: int = 0  # registered backing id, kept while the node is marked


class SharedCache:
    """Which opens of each inode are passthrough, and their backing ids."""

    def __init__(self, tree: CowTree, fuse_fd: int) -> None:
        self.tree, self.fuse_fd = tree, fuse_fd
        self.enabled = True  # until the kernel or our privileges say otherwise
        self.opens: dict[int, _Opens] = {}

    def _get(self, node: Node) -> _Opens:
        o = self.opens.get(node.ino)
        if o is None or o.node is not node:
            if o is not None:
                self._unregister(o)
            o = self.opens[node.ino] = _Opens(node)
        return o

    def open(self, node: Node, flags: int, changing: bool) -> tuple[int, int]:
        """(fh, backing id or 0) for an open of node with these flags;
        changing: a truncate of it is under way."""
        if not node.marked and node.ino not in self.opens:
            return FH_UNTRACKED, 0
        o = self._get(node)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        if o.passthrough:
            if write:
                raise _held()
            o.passthrough += 1
            return FH_PASSTHROUGH, o.backing
        if not write and node.marked and not o.cached and not changing and self.enabled:
            if not o.backing and self._big(node):
                o.backing = self._register(node)
            if o.backing:
                o.passthrough += 1
                return FH_PASSTHROUGH, o.backing
        o.cached += 1
        return FH_CACHED, 0

    @staticmethod
    def _big(node: Node) -> bool:
        return os.fstat(node.fd).st_size >= SHARED_MIN

    def _register(self, node: Node) -> int:
        fd = self.tree.io(node, False)  # read-only: nothing can write through a passthrough open
        try:
            return sys.backing_open(self.fuse_fd, fd)
        except OSError as e:
            # EPERM: not root in the initial namespace; ELOOP: the backing
            # tree is itself on a stacked filesystem.  Cached opens still work.
            log.warning("shared page cache off: the kernel refused a backing file: %s", e)
            self.enabled = False
            return 0

    def release(self, ino: int, fh: int) -> None:
        o = self.opens.get(ino)
        if o is None:
            return
        if fh == FH_PASSTHROUGH:
            o.passthrough = max(0, o.passthrough - 1)
            if not o.passthrough and not o.node.marked:
                self._unregister(o)  # the link broke: the next opens are cached
        elif fh == FH_CACHED:
            o.cached = max(0, o.cached - 1)
        if not (o.cached or o.passthrough or o.backing):
            del self.opens[ino]

    def busy(self, ino: int) -> bool:
        """Open passthrough: its content must not change."""
        o = self.opens.get(ino)
        return o is not None and o.passthrough > 0

    def refuse_change(self, ino: int) -> None:
        """A truncate: refused while a passthrough reader could not follow it."""
        if self.busy(ino):
            raise _held()

    def forget(self, ino: int) -> None:
        """The kernel forgot the inode: no file of it is open."""
        o = self.opens.pop(ino, None)
        if o is not None:
            self._unregister(o)

    def _unregister(self, o: _Opens) -> None:
        if o.backing:
            try:
                sys.backing_close(self.fuse_fd, o.backing)
            except OSError as e:
                if e.errno != errno.ENODEV:  # unmounted meanwhile
                    raise
            o.backing = 0
