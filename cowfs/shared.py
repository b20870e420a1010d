"""One page cache for shared files, and native I/O on private ones: FUSE
passthrough (Linux 6.9+).

A FUSE mount caches file pages in its own inodes, so every guest held its
own copy of each template file it read: ~19 MiB for a booted Debian
guest, the same libc and systemd pages again in every guest.  Here a
read-only open of a marked (shared) file is handed to the kernel with the
shared inode as its backing file: reads and mmap, exec and shared
libraries included, use the backing filesystem's pages, one copy for the
template and all its guests (VServer's "one page cache for shared
libraries"), and no READ request reaches us.  An open of a private file
(the guest's own, unmarked) is passthrough to that file: reads, writes
and mmap run at the backing filesystem's speed, with no request at all.

The price: the kernel must send OPEN (and RELEASE) for every open, since
answering OPEN with ENOSYS, which stops it, is for the whole connection;
and it refuses passthrough alongside writeback caching, so what is still
written through us (a file being broken) is a request per write(2).

The kernel's rules (fs/fuse/iomode.c): an inode is open either cached or
passthrough, never both at once (a wrong answer fails the open with EIO),
and all its passthrough opens share one backing file.  Hence:
- the first open of an inode decides: passthrough for a read-only open of
  a marked file of 32 KiB or more, and for any open of a private file
  (but setuid and setgid ones: below); cached otherwise, and for a marked
  file being truncated;
- later opens while it is open follow.  Cached: cached.  Passthrough on
  the private file: anything.  Passthrough on the shared inode: a
  read-only open shares it (a chmod or chown broke the link meanwhile:
  the content is still the same), and an open for writing or a truncate
  is refused with ETXTBSY until those readers close, as for a running
  executable.  The content a passthrough reader sees can therefore never
  differ from the guest's file;
- the kernel writes passthrough as the daemon, root, which keeps setuid
  and setgid bits that a write by anyone else clears: files with them are
  opened cached, and a write-open joining readers of one is refused.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from . import sys
from .model import CowTree, Node, killed_by_write

log = logging.getLogger("cowfs")

# Smaller files are cached by each mount: they save little (a page or a
# few each) and are the ones written in place (configuration), which a
# passthrough reader would hold up (ETXTBSY, below).
SHARED_MIN = 32 * 1024

# File handles in OPEN replies: RELEASE tells which kind of open ended.
# Untracked: passthrough is off (the kernel refused a backing file), the
# open is of a private file and needs no bookkeeping; the serving loop
# answers its RELEASE before decoding it (fuse.py).
FH_UNTRACKED, FH_CACHED, FH_PASSTHROUGH = 0, 1, 2


def _held() -> OSError:
    return OSError(errno.ETXTBSY, "open for reading passthrough")


def _setid(node: Node) -> bool:
    """A write by an unprivileged process must clear its setuid or setgid
    bit.  The kernel does that for cached writes (asking us), but writes
    passthrough as the daemon, which is root: so no passthrough writes."""
    return killed_by_write(os.fstat(node.fd).st_mode) != 0


@dataclass
class _Opens:
    node: Node  # a node number can be reused once the kernel forgets it
    cached: int = 0
    passthrough: int = 0
    # The registered backing id, kept until the kernel forgets the node (a
    # registration is two ioctls, as much as the OPEN they would add to),
    # or until the link breaks if it is the shared inode.
    backing: int = 0
    shared: bool = False  # the backing is the shared inode (else the node's own)


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
        if not self.enabled and node.ino not in self.opens:
            return FH_UNTRACKED, 0
        o = self._get(node)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        if o.passthrough:
            if write and (o.shared or _setid(node)):
                raise _held()
            o.passthrough += 1
            return FH_PASSTHROUGH, o.backing
        if not o.cached and self.enabled and self._backing(o, write, changing):
            o.passthrough += 1
            return FH_PASSTHROUGH, o.backing
        o.cached += 1
        return FH_CACHED, 0

    def _backing(self, o: _Opens, write: bool, changing: bool) -> bool:
        """Whether a first open of o's node is passthrough; registers the
        backing file if it is.  A shared inode can back only reads (a write
        breaks the link); the guest's own file backs any open."""
        if o.node.marked:
            if write or changing or not (o.backing or self._big(o.node)):
                return False
            if not o.backing:
                o.backing, o.shared = self._register(o.node), True
        else:
            if o.backing and o.shared:
                self._unregister(o)  # the link broke while nothing had it open
            if _setid(o.node):
                return False
            if not o.backing:
                o.backing, o.shared = self._register(o.node), False
        return o.backing != 0

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
            if not o.passthrough and o.shared and not o.node.marked:
                self._unregister(o)  # the link broke: the next opens use the copy
        elif fh == FH_CACHED:
            o.cached = max(0, o.cached - 1)
        if not (o.cached or o.passthrough or o.backing):
            del self.opens[ino]

    def busy(self, ino: int) -> bool:
        """Open passthrough on the shared inode: its content must not change."""
        o = self.opens.get(ino)
        return o is not None and o.passthrough > 0 and o.shared

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
            o.backing, o.shared = 0, False
