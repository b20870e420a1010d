"""The guest's seccomp filter: what no guest process may ask the kernel.

A user namespace already takes most of the host's power away from guest
root: loading a module, kexec, swapon, acct or the kernel log all need a
capability in the host's namespace.  The filter refuses them anyway, and
refuses what a user namespace does not fence at all:

- io_uring: its operations (socket, openat, connect, ...) are not system
  calls, so seccomp never sees them; the sock_diag rule below would mean
  nothing.  Refused with ENOSYS, so programs fall back to plain syscalls.
- the kernel keyrings (keyctl, add_key, request_key): not namespaced; a
  guest's keys would sit beside the host's.  ENOSYS, as LXC does: systemd
  and the rest then run without them.
- bpf, perf_event_open, userfaultfd: large kernel attack surfaces that a
  VPS has no use for.
- the x32 ABI (x86_64 numbers with bit 30 set): most kernels disable it;
  refusing it here means a guest cannot reach a syscall through numbers
  this filter does not list.

A guest that needs one of them back names it in `allow_syscalls`.

For a guest in the host's network namespace (network = "isolated") it
also refuses socket(AF_NETLINK, *, NETLINK_SOCK_DIAG) with EACCES: sock_diag
is what `ss` uses to list every socket of the host and of other guests,
and needs no capability.  The 32-bit ABI's socketcall(2) multiplexer hides
its arguments from seccomp, so there it is refused (ENOSYS: libc then uses
socket(2), which is checked).

Classic BPF, assembled here; installed by PID 1 before it execs init and by
`vctx exec` before it execs its command, so every process of the guest
carries it.  The kernel caches the verdict of every syscall the filter
decides without looking at arguments: what the guest may call costs it
nothing per call.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Iterable

# struct seccomp_data
NR, ARCH, ARG0, ARG2 = 0, 4, 16, 32
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
AF_NETLINK = 16
NETLINK_SOCK_DIAG = 4
X32_BIT = 0x40000000

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028

# What each refused call gets back.  EPERM where the kernel would say the
# same to an unprivileged caller; ENOSYS where "this kernel has no such
# thing" is what lets programs carry on without it.
DENIED: dict[str, int] = {
    "kexec_load": errno.EPERM,
    "kexec_file_load": errno.EPERM,
    "init_module": errno.EPERM,
    "finit_module": errno.EPERM,
    "delete_module": errno.EPERM,
    "open_by_handle_at": errno.EPERM,
    "acct": errno.EPERM,
    "swapon": errno.EPERM,
    "swapoff": errno.EPERM,
    "syslog": errno.EPERM,
    "iopl": errno.EPERM,
    "ioperm": errno.EPERM,
    "bpf": errno.EPERM,
    "perf_event_open": errno.EPERM,
    "userfaultfd": errno.EPERM,
    "lookup_dcookie": errno.EPERM,
    "keyctl": errno.ENOSYS,
    "add_key": errno.ENOSYS,
    "request_key": errno.ENOSYS,
    "io_uring_setup": errno.ENOSYS,
    "io_uring_enter": errno.ENOSYS,
    "io_uring_register": errno.ENOSYS,
    "uselib": errno.ENOSYS,
    "nfsservctl": errno.ENOSYS,
    "vm86": errno.ENOSYS,
    "vm86old": errno.ENOSYS,
}

# System call numbers per ABI, of the calls above and of socket/socketcall
# (from the kernel's syscall tables; a call an ABI lacks is left out).
NUMBERS: dict[int, dict[str, int]] = {
    AUDIT_ARCH_X86_64: {
        "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "open_by_handle_at": 304, "acct": 163, "swapon": 167, "swapoff": 168,
        "syslog": 103, "iopl": 172, "ioperm": 173, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "lookup_dcookie": 212, "keyctl": 250, "add_key": 248, "request_key": 249,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "uselib": 134,
        "nfsservctl": 180, "socket": 41,
    },
    AUDIT_ARCH_I386: {
        "kexec_load": 283, "init_module": 128, "finit_module": 350, "delete_module": 129,
        "open_by_handle_at": 342, "acct": 51, "swapon": 87, "swapoff": 115, "syslog": 103,
        "iopl": 110, "ioperm": 101, "bpf": 357, "perf_event_open": 336, "userfaultfd": 374,
        "lookup_dcookie": 253, "keyctl": 288, "add_key": 286, "request_key": 287,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "uselib": 86,
        "nfsservctl": 169, "vm86": 166, "vm86old": 113, "socket": 359, "socketcall": 102,
    },
    AUDIT_ARCH_AARCH64: {
        "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "open_by_handle_at": 265, "acct": 89, "swapon": 224, "swapoff": 225,
        "syslog": 116, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "lookup_dcookie": 18,
        "keyctl": 219, "add_key": 217, "request_key": 218, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "nfsservctl": 42, "socket": 198,
    },
    AUDIT_ARCH_ARM: {
        "kexec_load": 347, "kexec_file_load": 401, "init_module": 128, "finit_module": 379,
        "delete_module": 129, "open_by_handle_at": 371, "acct": 51, "swapon": 87, "swapoff": 115,
        "syslog": 103, "bpf": 386, "perf_event_open": 364, "userfaultfd": 388, "lookup_dcookie": 249,
        "keyctl": 311, "add_key": 309, "request_key": 310, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "uselib": 86, "nfsservctl": 169, "socket": 281,
    },
}  # fmt: skip

# The ABIs a host of each machine type can run.
ABIS: dict[str, list[int]] = {
    "x86_64": [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386],
    "aarch64": [AUDIT_ARCH_AARCH64, AUDIT_ARCH_ARM],
}

# classic BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
JSET_K = 0x45
RET_K = 0x06

Insn = tuple[int, int, int, int]


def _stmt(code: int, k: int) -> Insn:
    return (code, 0, 0, k)


def check_allowed(names: Iterable[str]) -> None:
    """Every name is one the filter refuses (else the config means nothing)."""
    for n in names:
        if n not in DENIED:
            raise ValueError(f"{n!r} is not a system call vctx refuses (those are: {', '.join(sorted(DENIED))})")


def _block(arch: int, allowed: frozenset[str], sock_diag: bool) -> list[Insn]:
    """The checks for one ABI; entered with nothing loaded, always returns."""
    nrs = NUMBERS[arch]
    b: list[Insn] = [_stmt(LD_W_ABS, NR)]
    if arch == AUDIT_ARCH_X86_64:
        b.append((JSET_K, 0, 1, X32_BIT))
        b.append(_stmt(RET_K, RET_ERRNO | errno.ENOSYS))
    for name in sorted(DENIED.keys() - allowed, key=lambda n: nrs.get(n, -1)):
        if name in nrs:
            b.append((JEQ_K, 0, 1, nrs[name]))
            b.append(_stmt(RET_K, RET_ERRNO | DENIED[name]))
    if sock_diag:
        if "socketcall" in nrs:
            b.append((JEQ_K, 0, 1, nrs["socketcall"]))
            b.append(_stmt(RET_K, RET_ERRNO | errno.ENOSYS))
        b.append((JEQ_K, 0, 4, nrs["socket"]))
        b.append(_stmt(LD_W_ABS, ARG0))
        b.append((JEQ_K, 0, 2, AF_NETLINK))
        b.append(_stmt(LD_W_ABS, ARG2))
        b.append((JEQ_K, 1, 0, NETLINK_SOCK_DIAG))
        b.append(_stmt(RET_K, RET_ALLOW))
        b.append(_stmt(RET_K, RET_ERRNO | errno.EACCES))
    b.append(_stmt(RET_K, RET_ALLOW))
    return b


@functools.cache
def build(sock_diag: bool, allowed: frozenset[str], machine: str | None = None) -> bytes:
    """The filter for this machine's ABIs (empty where vctx knows none).

    sock_diag: also refuse sock_diag netlink sockets (isolated network).
    allowed: names from DENIED to let through after all.  (No defaults:
    the cache keys on the arguments as passed, so every caller spells
    them out the same way.)
    """
    abis = ABIS.get(machine or os.uname().machine)
    if not abis:
        return b""
    check_allowed(allowed)
    # Each ABI's block follows the test of its arch, which skips it when
    # the arch differs: jumps only ever go forward, and stay short.
    prog: list[Insn] = [_stmt(LD_W_ABS, ARCH)]
    for arch in abis:
        block = _block(arch, allowed, sock_diag)
        assert len(block) < 256, "a conditional jump reaches 255 instructions"
        prog.append((JEQ_K, 0, len(block), arch))
        prog += block
    prog.append(_stmt(RET_K, RET_ERRNO | errno.ENOSYS))  # an ABI this machine should not have
    return b"".join(struct.pack("<HBBI", c, jt, jf, k & 0xFFFFFFFF) for c, jt, jf, k in prog)
