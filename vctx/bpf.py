"""eBPF without a compiler: an assembler for the few programs vctx needs,
and maps, programs and cgroup attachments through bpf(2).

The programs are small (a few dozen instructions), so they are written as
instructions in Python (netprog.py) and assembled here at boot: nothing to
build, no clang or libbpf on the host.  Jumps go to named labels; the
assembler resolves them.  The verifier's log comes back in the error when
the kernel refuses a program.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from dataclasses import dataclass, field

from . import sys as k

# bpf(2) commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, OBJ_PIN, OBJ_GET, PROG_ATTACH, PROG_DETACH = 5, 6, 7, 8, 9
PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY = 13, 15, 16

MAP_HASH, MAP_ARRAY = 1, 2
PROG_SCHED_CLS, PROG_CGROUP_SOCK, PROG_CGROUP_SOCK_ADDR = 3, 9, 18
F_ALLOW_MULTI = 1 << 1
ATTR_SIZE = 144

# instruction classes, sizes, modes, operations
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0, 1, 2, 3, 4, 5, 6, 7
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
K, X = 0x00, 0x08
ALU_OPS = {"add": 0x00, "sub": 0x10, "or": 0x40, "and": 0x50, "lsh": 0x60, "rsh": 0x70, "xor": 0xA0, "mov": 0xB0}
JMP_OPS = {"==": 0x10, ">": 0x20, ">=": 0x30, "&": 0x40, "!=": 0x50, "<": 0xA0, "<=": 0xB0}
CALL, EXIT = 0x80, 0x90
PSEUDO_MAP_FD = 1
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, FP = range(11)
SIZES = {1: B, 2: H, 4: W, 8: DW}

FUNC_MAP_LOOKUP_ELEM = 1
FUNC_BIND = 64


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, _s32(imm))


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


@dataclass
class Asm:
    """A program under construction: append instructions, label targets, assemble."""

    code: list[tuple[bytes, str | None]] = field(default_factory=list)  # (insn, label it jumps to)
    labels: dict[str, int] = field(default_factory=dict)

    def _emit(self, raw: bytes, target: str | None = None) -> None:
        self.code.append((raw, target))

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = len(self.code)

    def mov(self, dst: int, src: int | None = None, imm: int = 0) -> None:
        """dst = src (a register) or dst = imm (64-bit, sign-extended from 32)."""
        if src is None:
            self._emit(_insn(ALU64 | ALU_OPS["mov"] | K, dst, imm=imm))
        else:
            self._emit(_insn(ALU64 | ALU_OPS["mov"] | X, dst, src))

    def mov32(self, dst: int, imm: int) -> None:
        """dst = imm as an unsigned 32-bit value (upper half zero)."""
        self._emit(_insn(ALU | ALU_OPS["mov"] | K, dst, imm=imm))

    def alu(self, op: str, dst: int, src: int | None = None, imm: int = 0) -> None:
        if src is None:
            self._emit(_insn(ALU64 | ALU_OPS[op] | K, dst, imm=imm))
        else:
            self._emit(_insn(ALU64 | ALU_OPS[op] | X, dst, src))

    def load(self, size: int, dst: int, src: int, off: int) -> None:
        """dst = *(size *)(src + off)"""
        self._emit(_insn(LDX | SIZES[size] | MEM, dst, src, off))

    def store(self, size: int, dst: int, off: int, src: int) -> None:
        """*(size *)(dst + off) = src (a register)"""
        self._emit(_insn(STX | SIZES[size] | MEM, dst, src, off))

    def store_imm(self, size: int, dst: int, off: int, imm: int) -> None:
        self._emit(_insn(ST | SIZES[size] | MEM, dst, 0, off, imm))

    def jmp(self, target: str) -> None:
        self._emit(_insn(JMP | 0x00), target)

    def jif(self, reg: int, op: str, target: str, imm: int = 0, src: int | None = None, wide: bool = False) -> None:
        """if (reg op imm/src) goto target.  Compares the low 32 bits unless
        wide: addresses and flags here are u32 and imm would sign-extend."""
        cls = JMP if wide else JMP32
        if src is None:
            self._emit(_insn(cls | JMP_OPS[op] | K, reg, imm=imm), target)
        else:
            self._emit(_insn(cls | JMP_OPS[op] | X, reg, src), target)

    def call(self, func: int) -> None:
        self._emit(_insn(JMP | CALL, imm=func))

    def ret(self, value: int) -> None:
        self.mov(R0, imm=value)
        self._emit(_insn(JMP | EXIT))

    def load_map(self, dst: int, map_fd: int) -> None:
        """dst = the map (a 16-byte instruction the kernel patches with the map's address)."""
        self._emit(_insn(LD | DW | IMM, dst, PSEUDO_MAP_FD, imm=map_fd))
        self._emit(_insn(0))

    def assemble(self) -> bytes:
        out = []
        for i, (raw, target) in enumerate(self.code):
            if target is None:
                out.append(raw)
                continue
            if target not in self.labels:
                raise ValueError(f"jump to undefined label {target}")
            code, regs, _, imm = struct.unpack("<BBhi", raw)
            out.append(struct.pack("<BBhi", code, regs, self.labels[target] - i - 1, imm))
        return b"".join(out)


def _attr(*fields: tuple[int, str, int | bytes]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed bpf_attr with the given (offset, struct format, value) fields."""
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    for off, fmt, value in fields:
        struct.pack_into(fmt, buf, off, value)
    return buf


def _ptr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


class Map:
    """A BPF map held by fd: created, or opened from its pin in bpffs."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self.fd, self.key_size, self.value_size = fd, key_size, value_size

    @classmethod
    def create(cls, kind: int, key_size: int, value_size: int, max_entries: int, name: str) -> Map:
        attr = _attr(
            (0, "<I", kind),
            (4, "<I", key_size),
            (8, "<I", value_size),
            (12, "<I", max_entries),
            (28, "16s", name.encode()[:15]),
        )
        return cls(k.bpf(MAP_CREATE, attr, name), key_size, value_size)

    @classmethod
    def open_pinned(cls, path: str, key_size: int, value_size: int) -> Map:
        raw = ctypes.create_string_buffer(path.encode())
        return cls(k.bpf(OBJ_GET, _attr((0, "<Q", _ptr(raw))), path), key_size, value_size)

    def pin(self, path: str) -> None:
        raw = ctypes.create_string_buffer(path.encode())
        k.bpf(OBJ_PIN, _attr((0, "<Q", _ptr(raw)), (8, "<I", self.fd)), path)

    def update(self, key: bytes, value: bytes) -> None:
        kb, vb = ctypes.create_string_buffer(key, self.key_size), ctypes.create_string_buffer(value, self.value_size)
        k.bpf(MAP_UPDATE_ELEM, _attr((0, "<I", self.fd), (8, "<Q", _ptr(kb)), (16, "<Q", _ptr(vb))), "map update")

    def delete(self, key: bytes) -> bool:
        kb = ctypes.create_string_buffer(key, self.key_size)
        try:
            k.bpf(MAP_DELETE_ELEM, _attr((0, "<I", self.fd), (8, "<Q", _ptr(kb))), "map delete")
        except FileNotFoundError:
            return False
        return True

    def lookup(self, key: bytes) -> bytes | None:
        kb, vb = ctypes.create_string_buffer(key, self.key_size), ctypes.create_string_buffer(self.value_size)
        try:
            k.bpf(MAP_LOOKUP_ELEM, _attr((0, "<I", self.fd), (8, "<Q", _ptr(kb)), (16, "<Q", _ptr(vb))), "map lookup")
        except FileNotFoundError:
            return None
        return vb.raw

    def items(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        key: bytes | None = None
        while True:
            kb = ctypes.create_string_buffer(key or b"", self.key_size)
            nb = ctypes.create_string_buffer(self.key_size)
            try:
                k.bpf(
                    MAP_GET_NEXT_KEY,
                    _attr((0, "<I", self.fd), (8, "<Q", 0 if key is None else _ptr(kb)), (16, "<Q", _ptr(nb))),
                    "map iterate",
                )
            except FileNotFoundError:
                return out
            key = nb.raw
            value = self.lookup(key)
            if value is not None:
                out.append((key, value))

    def close(self) -> None:
        os.close(self.fd)


INTERRUPTED_FOR = 5.0  # seconds of EAGAIN before a load is given up


def load_program(kind: int, attach_type: int, insns: bytes, name: str) -> int:
    """Load a program; the verifier's complaint becomes the error message.

    The verifier gives up with EAGAIN when a signal is pending, and vctxd
    takes SIGCHLD whenever a process it started exits: tried again, as
    libbpf does (for as long as it takes, within reason).  These attempts
    ask for no log, which the verifier would write line by line for every
    instruction of a program it accepts (6 ms of a guest's boot); a refusal
    is loaded once more with the log, for its message."""
    deadline = time.monotonic() + INTERRUPTED_FOR
    while True:
        try:
            return _prog_load(kind, attach_type, insns, name, None)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                break
            if time.monotonic() > deadline:
                raise OSError(
                    e.errno, f"the kernel refused BPF program {name}: interrupted by signals for {INTERRUPTED_FOR:.0f}s"
                ) from None
    log = ctypes.create_string_buffer(1 << 16)
    try:
        return _prog_load(kind, attach_type, insns, name, log)  # (it loaded this time: so be it)
    except OSError as e:
        verdict = log.value.decode(errors="replace").strip().splitlines()
        tail = " | ".join(verdict[-3:]) if verdict else ""
        raise OSError(e.errno, f"the kernel refused BPF program {name}: {e.strerror} {tail}") from None


def _prog_load(kind: int, attach_type: int, insns: bytes, name: str, log: ctypes.Array[ctypes.c_char] | None) -> int:
    lic = ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))
    attr = _attr(
        (0, "<I", kind),
        (4, "<I", len(insns) // 8),
        (8, "<Q", _ptr(code)),
        (16, "<Q", _ptr(lic)),
        (24, "<I", 0 if log is None else 1),
        (28, "<I", 0 if log is None else len(log)),
        (32, "<Q", 0 if log is None else _ptr(log)),
        (48, "16s", name.encode()[:15]),
        (68, "<I", attach_type),
    )
    return k.bpf(PROG_LOAD, attr, name)


def attach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    """Attach to a cgroup with BPF_F_ALLOW_MULTI: programs the guest's
    descendants or host tools add run too, and none can override ours."""
    k.bpf(
        PROG_ATTACH, _attr((0, "<I", cgroup_fd), (4, "<I", prog_fd), (8, "<I", attach_type), (12, "<I", F_ALLOW_MULTI))
    )


def detach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    k.bpf(PROG_DETACH, _attr((0, "<I", cgroup_fd), (4, "<I", prog_fd), (8, "<I", attach_type)))


def query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to this cgroup itself for attach_type."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr((0, "<I", cgroup_fd), (4, "<I", attach_type), (16, "<Q", ctypes.addressof(ids)), (24, "<I", 64))
    try:
        k.bpf(PROG_QUERY, attr, "query")
    except OSError as e:
        if e.errno == errno.EINVAL:
            return []
        raise
    count = struct.unpack_from("<I", attr, 24)[0]
    return list(ids[:count])


def prog_fd_by_id(prog_id: int) -> int:
    return k.bpf(PROG_GET_FD_BY_ID, _attr((0, "<I", prog_id)), prog_id)


def prog_name(prog_fd: int) -> str:
    """The name a program was loaded with (struct bpf_prog_info.name at offset 64)."""
    info = ctypes.create_string_buffer(256)
    attr = _attr((0, "<I", prog_fd), (4, "<I", len(info)), (8, "<Q", _ptr(info)))
    k.bpf(OBJ_GET_INFO_BY_FD, attr, "prog info")
    return info.raw[64:80].split(b"\0", 1)[0].decode()
