"""The immutable-but-unlinkable mark (VServer's IMMUTABLE + IUNLINK).

It lives in a trusted.* xattr on the backing inode, so every hard link shares
it and only host root can read or change it; the FUSE adapter hides the whole
``trusted.cowfs.`` prefix from guests.
"""

from __future__ import annotations

import errno
import os

from .sys import proc_fd

PREFIX = "trusted.cowfs."
IUNLINK = PREFIX + "iunlink"
IUNLINK_B = IUNLINK.encode()
# On the root of a tree of private copies (clone --copy), served without
# cowfs: nothing may ever be hard-linked into it.
PRIVATE = PREFIX + "private"
_ABSENT = (errno.ENODATA, errno.ENOTSUP)


def _target(fd: int | None, path: str | None) -> str | int:
    if fd is not None:
        # O_PATH fds refuse f*xattr; the /proc magic link reaches the inode
        # without any path resolution in the guest's tree.
        return proc_fd(fd)
    assert path is not None
    return path


def is_marked(fd: int | None = None, path: str | None = None) -> bool:
    try:
        os.getxattr(_target(fd, path), IUNLINK, follow_symlinks=fd is not None)
    except OSError as e:
        if e.errno in _ABSENT:
            return False
        raise
    return True


def set_mark(fd: int | None = None, path: str | None = None) -> None:
    os.setxattr(_target(fd, path), IUNLINK, b"", follow_symlinks=fd is not None)


def clear_mark(fd: int | None = None, path: str | None = None) -> bool:
    """Remove the mark; False if there was none."""
    try:
        os.removexattr(_target(fd, path), IUNLINK, follow_symlinks=fd is not None)
    except OSError as e:
        if e.errno in _ABSENT:
            return False
        raise
    return True


def is_internal_xattr(name: str | bytes) -> bool:
    """xattrs of ours that a guest may neither see nor set."""
    if isinstance(name, bytes):
        return name.startswith(PREFIX.encode())
    return name.startswith(PREFIX)
