"""Making the private copy that breaks a shared link.

The copy is built as an anonymous O_TMPFILE inode in the directory that holds
the name, so while data and metadata are copied nothing is visible and a crash
leaves nothing behind.  Only the finished copy gets a (reserved) temporary
name, which rename(2) then moves over the original atomically: at every
moment the path holds either the old link or the complete copy.
"""

from __future__ import annotations

import errno
import os
import stat

from . import mark
from .sys import O_TMPFILE, copy_data, link_fd, proc_fd, renameat2, utimens_fd

# Names a guest can never create (the adapter refuses them, readdir hides them),
# so a leftover one is always ours and the next mount may remove it.
TEMP_PREFIX = b".#cowfs."


def is_temp_name(name: bytes) -> bool:
    return name.startswith(TEMP_PREFIX)


def _copy_xattrs(src: int, dst: int) -> None:
    for name in os.listxattr(src):
        if mark.is_internal_xattr(name):
            continue
        try:
            value = os.getxattr(src, name)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed under us
                continue
            raise
        os.setxattr(dst, name, value)


def make_copy(dir_fd: int, src_path_fd: int) -> int:
    """An unnamed private copy, in dir_fd, of the file behind src_path_fd.

    Returns an O_RDWR fd of the O_TMPFILE inode.  Order matters: chown first
    (it clears set-id bits and file capabilities), then the mode, then the
    xattrs (ACLs and security.capability among them), the times last.
    """
    src = os.open(proc_fd(src_path_fd), os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "only regular files are copied on write")
        tmp = os.open(".", O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            copy_data(tmp, src, st.st_size)
            os.fchown(tmp, st.st_uid, st.st_gid)
            os.fchmod(tmp, stat.S_IMODE(st.st_mode))
            _copy_xattrs(src, tmp)
            utimens_fd(tmp, st.st_atime_ns, st.st_mtime_ns)
        except BaseException:
            os.close(tmp)
            raise
        return tmp
    finally:
        os.close(src)


def install(tmp_fd: int, dir_fd: int, name: bytes) -> None:
    """Atomically replace dir_fd/name by the inode behind tmp_fd."""
    tmp_name = TEMP_PREFIX + os.urandom(8).hex().encode()
    link_fd(tmp_fd, dir_fd, tmp_name)
    try:
        renameat2(dir_fd, tmp_name, dir_fd, name)
    except BaseException:
        os.unlink(tmp_name, dir_fd=dir_fd)
        raise
