"""The guest's seccomp filter: what an isolated guest may not ask the kernel.

A guest sharing the host's network namespace could list every socket of the
host and of other guests through sock_diag netlink (what `ss` uses; no
capability needed).  socket(AF_NETLINK, *, NETLINK_SOCK_DIAG) fails with
EACCES instead.  On x86_64 the 32-bit ABI's socketcall(2) multiplexer hides
its arguments from seccomp, so it is refused (ENOSYS: libc then uses
socket(2), which is checked).

Classic BPF, assembled here; installed by PID 1 before it execs init and by
`vctx exec` before it execs its command, so every process of the guest
carries it.
"""

from __future__ import annotations

import errno
import functools
import os
import struct

# struct seccomp_data
NR, ARCH, ARG0, ARG2 = 0, 4, 16, 32
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
AF_NETLINK = 16
NETLINK_SOCK_DIAG = 4
X32_BIT = 0x40000000

# (audit arch, socket nr, socketcall nr or None) per ABI a host of this
# machine type can run.
ABIS: dict[str, list[tuple[int, int, int | None]]] = {
    "x86_64": [(0xC000003E, 41, None), (0x40000003, 359, 102)],
    "aarch64": [(0xC00000B7, 198, None), (0x40000028, 281, None)],
}

# classic BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
AND_K = 0x54
RET_K = 0x06


def _stmt(code: int, k: int) -> tuple[int, int, int, int]:
    return (code, 0, 0, k)


@functools.cache
def build(machine: str | None = None) -> bytes:
    """The filter for this machine's ABIs (empty where vctx knows none)."""
    abis = ABIS.get(machine or os.uname().machine)
    if not abis:
        return b""
    deny = RET_ERRNO | errno.EACCES
    prog: list[tuple[int, int, int, int]] = []
    # Laid out as one block per ABI; each block ends in ALLOW, so jumps only
    # go forward to "the next instruction" or "skip to the end of the block".
    prog.append(_stmt(LD_W_ABS, ARCH))
    blocks: list[list[tuple[int, int, int, int]]] = []
    for arch, socket_nr, socketcall_nr in abis:
        b: list[tuple[int, int, int, int]] = [_stmt(LD_W_ABS, NR)]
        if arch == 0xC000003E:
            b.append(_stmt(AND_K, ~X32_BIT & 0xFFFFFFFF))  # x32 shares the numbers
        if socketcall_nr is not None:
            b.append((JEQ_K, 0, 1, socketcall_nr))
            b.append(_stmt(RET_K, RET_ERRNO | errno.ENOSYS))
        b.append((JEQ_K, 0, 4, socket_nr))
        b.append(_stmt(LD_W_ABS, ARG0))
        b.append((JEQ_K, 0, 2, AF_NETLINK))
        b.append(_stmt(LD_W_ABS, ARG2))
        b.append((JEQ_K, 1, 0, NETLINK_SOCK_DIAG))
        b.append(_stmt(RET_K, RET_ALLOW))
        b.append(_stmt(RET_K, deny))
        blocks.append(b)
    # The arch dispatch: "jeq arch" jumps over the blocks before its own.
    dispatch: list[tuple[int, int, int, int]] = []
    n = len(blocks)
    offsets = []
    total = 0
    for b in blocks:
        offsets.append(total)
        total += len(b)
    for i, _ in enumerate(blocks):
        # from dispatch instruction i, the blocks start after the remaining
        # dispatch instructions and the final ALLOW
        jt = (n - i - 1) + 1 + offsets[i]
        dispatch.append((JEQ_K, jt, 0, abis[i][0]))
    dispatch.append(_stmt(RET_K, RET_ALLOW))  # an ABI we do not know: nothing of ours applies
    prog += dispatch
    for b in blocks:
        prog += b
    return b"".join(struct.pack("<HBBI", c, jt, jf, k & 0xFFFFFFFF) for c, jt, jf, k in prog)
