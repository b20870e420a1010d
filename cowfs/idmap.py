"""Id shifting between the backing tree and what a guest sees.

One template backs guests that live in different user-namespace ranges: ids
stored in the backing tree are shown shifted by the guest's offset and shifted
back on chown and create.  An id outside the guest's range cannot be stored.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

OVERFLOW_ID = 65534  # the kernel's overflowuid: what unmapped ids look like
ACL_XATTRS = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})
_ACL_USER, _ACL_GROUP = 0x02, 0x08
CAPS_XATTR = b"security.capability"
_CAPS_REV_MASK, _CAPS_V2, _CAPS_V3 = 0xFF000000, 0x02000000, 0x03000000
_CAPS_V2_SIZE, _CAPS_V3_SIZE = 20, 24


@dataclass(frozen=True)
class IdMap:
    uid_offset: int = 0
    gid_offset: int = 0
    size: int = 0  # 0: identity, no range to enforce

    @property
    def identity(self) -> bool:
        return self.size == 0

    def uid_out(self, backing: int) -> int:
        if self.identity:
            return backing
        return backing + self.uid_offset if backing < self.size else OVERFLOW_ID

    def gid_out(self, backing: int) -> int:
        if self.identity:
            return backing
        return backing + self.gid_offset if backing < self.size else OVERFLOW_ID

    def uid_in(self, shown: int, err: int = errno.EINVAL) -> int:
        return self._in(shown, self.uid_offset, err)

    def gid_in(self, shown: int, err: int = errno.EINVAL) -> int:
        return self._in(shown, self.gid_offset, err)

    def _in(self, shown: int, offset: int, err: int) -> int:
        if self.identity:
            return shown
        if not offset <= shown < offset + self.size:
            raise OSError(err, f"id {shown} is outside the range {offset}..{offset + self.size - 1}")
        return shown - offset

    def fscaps(self, value: bytes, inbound: bool) -> bytes:
        """Shift the root id of a file capability (security.capability).

        The backing tree keeps a template's caps as they are: v2, whose root
        is uid 0 — the guest's root.  A guest sees them as v3 with its
        root's host uid, so the kernel applies them in the guest's user
        namespace (a v2 cap on this mount would belong to the host's root
        and be ignored there: a guest user's ping would have no
        cap_net_raw).  A guest's own setcap arrives as v3 with that uid, and
        is stored as v2 again; a v3 for some other root is stored with its
        id shifted back.
        """
        if self.identity:
            return value
        if len(value) == _CAPS_V2_SIZE and value[3] == _CAPS_V2 >> 24:
            root = 0
        elif len(value) == _CAPS_V3_SIZE and value[3] == _CAPS_V3 >> 24:
            root = struct.unpack_from("<I", value, 20)[0]
        else:
            return value  # not a layout the kernel accepts: it refuses it itself
        magic = struct.unpack_from("<I", value)[0] & ~_CAPS_REV_MASK
        body = value[4:_CAPS_V2_SIZE]
        if inbound:
            if len(value) == _CAPS_V2_SIZE:
                return value  # host root's own v2, through the mount: the guest's root
            root = self.uid_in(root)
            if root == 0:
                return struct.pack("<I", magic | _CAPS_V2) + body
            return struct.pack("<I", magic | _CAPS_V3) + body + struct.pack("<I", root)
        return struct.pack("<I", magic | _CAPS_V3) + body + struct.pack("<I", self.uid_out(root))

    def acl(self, value: bytes, inbound: bool) -> bytes:
        """Shift the ids inside a POSIX ACL xattr (version 2 layout)."""
        if self.identity or len(value) < 4:
            return value
        out = bytearray(value)
        for off in range(4, len(value) - 7, 8):
            tag, _perm, ident = struct.unpack_from("<HHI", value, off)
            if tag == _ACL_USER:
                ident = self.uid_in(ident) if inbound else self.uid_out(ident)
            elif tag == _ACL_GROUP:
                ident = self.gid_in(ident) if inbound else self.gid_out(ident)
            else:
                continue
            struct.pack_into("<I", out, off + 4, ident)
        return bytes(out)
