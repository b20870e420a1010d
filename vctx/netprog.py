"""The network context as cgroup socket-address BPF programs.

An isolated guest shares the host's network stack, as a VServer guest did.
What makes it a context is a set of programs on its cgroup v2 node that run
at bind, connect, sendmsg, recvmsg, getsockname and getpeername, before the
kernel acts on an address, and never per packet:

- bind: only the guest's own addresses.  The wildcard becomes its primary
  address; 127.0.0.1 (any 127/8 address not another guest's) becomes its own
  loopback address; ::1 its IPv6 loopback.  The privileged-port check is
  waived for the guest's addresses (return value 3), so guest root serves
  port 80 on them though it has no capability in the host's network.
- connect, UDP sendmsg: loopback destinations (127/8, 0.0.0.0, ::1, ::,
  any guest's loopback) go to the guest's own loopback, so it never reaches
  the host's or another guest's local services; other guests' public
  addresses in 127/8 stay reachable.  The source is always the guest's:
  bpf_bind() before connect, msg_src for unconnected UDP.
- getsockname, getpeername, UDP recvmsg: the guest's loopback address shows
  as 127.0.0.1 / ::1, which is what its programs expect.
- socket creation: no raw sockets (guest root has no CAP_NET_RAW in the
  host's network anyway; this says so a second time).

The programs read the guest's addresses from two maps (conf, addrs), so a
running guest's addresses change by map updates, without reloading
anything.  A host-wide map (public) holds every guest's 127/8 addresses: the
ones a connect to 127/8 must not redirect.  IPv4 lives in IPv6 keys as
v4-mapped addresses, so one key format serves both families.

Addresses are in network byte order; a 4-byte load puts the first octet in
the low byte, hence the constants below.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .bpf import (
    FP,
    FUNC_BIND,
    FUNC_MAP_LOOKUP_ELEM,
    PROG_CGROUP_SOCK,
    PROG_CGROUP_SOCK_ADDR,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    Asm,
)

# attach types (enum bpf_attach_type)
INET_SOCK_CREATE = 2
INET4_BIND, INET6_BIND, INET4_CONNECT, INET6_CONNECT = 8, 9, 10, 11
UDP4_SENDMSG, UDP6_SENDMSG, UDP4_RECVMSG, UDP6_RECVMSG = 14, 15, 19, 20
INET4_GETPEERNAME, INET6_GETPEERNAME, INET4_GETSOCKNAME, INET6_GETSOCKNAME = 29, 30, 31, 32

# struct bpf_sock_addr
USER_IP4, USER_IP6, MSG_SRC_IP4, MSG_SRC_IP6, SK = 4, 8, 40, 44, 64
# struct bpf_sock
SOCK_TYPE, SK_SRC_IP4, SK_SRC_IP6 = 8, 24, 28
SOCK_RAW = 3
AF_INET, AF_INET6 = 2, 10

# The conf map's one value (CONF_SIZE bytes).
C_PRIMARY4, C_LO4, C_PRIMARY6, C_LO6, C_HAS6, C_HASLO6 = 0, 4, 8, 24, 40, 44
CONF_SIZE = 48
KEY_SIZE = 16

# Stack slots (offsets from the frame pointer).
S_KEY = -16  # a 16-byte map key
S_CONF = -20  # the conf map's key, 0
S_SRC = -40  # the chosen source, 16 bytes (IPv6 or v4-mapped)
S_SA = -72  # a sockaddr_in / sockaddr_in6 for bpf_bind, 32 bytes

MAPPED = 0xFFFF0000  # ::ffff:0:0/96's third word
LOOP6 = 0x01000000  # ::1's last word
LOCALHOST4 = 0x0100007F  # 127.0.0.1
# Guests' IPv6 loopback addresses: fd76:6374:7800::/64 ("vctx", a ULA nobody routes).
LO6_NET = ipaddress.IPv6Network("fd76:6374:7800::/64")
_LO6_A, _LO6_B = struct.unpack("<II", LO6_NET.network_address.packed[:8])
LO4_NET = ipaddress.IPv4Network("127.255.0.0/16")


def word(addr: ipaddress.IPv4Address) -> int:
    """An IPv4 address as the u32 a BPF load of it yields."""
    return int(struct.unpack("<I", addr.packed)[0])


def key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 16-byte map key: IPv6 as is, IPv4 v4-mapped."""
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{addr}").packed
    return addr.packed


@dataclass(frozen=True)
class Conf:
    primary4: ipaddress.IPv4Address | None
    lo4: ipaddress.IPv4Address
    primary6: ipaddress.IPv6Address | None
    lo6: ipaddress.IPv6Address | None

    def pack(self) -> bytes:
        return struct.pack(
            "<4s4s16s16sII",
            self.primary4.packed if self.primary4 else bytes(4),
            self.lo4.packed,
            self.primary6.packed if self.primary6 else bytes(16),
            self.lo6.packed if self.lo6 else bytes(16),
            1 if self.primary6 else 0,
            1 if self.lo6 else 0,
        )


# --- building blocks ------------------------------------------------------------------


def _prologue(a: Asm, conf_fd: int, on_fail: int) -> None:
    """r6 = ctx, r8 = the conf value (or return on_fail if the map is empty)."""
    a.mov(R6, R1)
    a.store_imm(4, FP, S_CONF, 0)
    _lookup(a, conf_fd, S_CONF)
    a.jif(R0, "!=", "conf_ok", wide=True)
    a.ret(on_fail)
    a.label("conf_ok")
    a.mov(R8, R0)


def _lookup(a: Asm, map_fd: int, slot: int) -> None:
    a.load_map(R1, map_fd)
    a.mov(R2, FP)
    a.alu("add", R2, imm=slot)
    a.call(FUNC_MAP_LOOKUP_ELEM)


def _mapped(a: Asm, slot: int, reg: int) -> None:
    """The 16-byte stack slot = reg as a v4-mapped address (a map key, a source)."""
    a.store_imm(4, FP, slot, 0)
    a.store_imm(4, FP, slot + 4, 0)
    a.store_imm(4, FP, slot + 8, MAPPED)
    a.store(4, FP, slot + 12, reg)


def _unless_127(a: Asm, reg: int, target: str) -> None:
    """goto target unless reg (an IPv4 address) is in 127.0.0.0/8."""
    a.mov(R1, reg)
    a.alu("and", R1, imm=0xFF)
    a.jif(R1, "!=", target, imm=127)


def _copy16(a: Asm, dst: int, dst_off: int, src: int, src_off: int) -> None:
    for i in range(0, 16, 4):
        a.load(4, R1, src, src_off + i)
        a.store(4, dst, dst_off + i, R1)


def _classify4(a: Asm, addrs_fd: int, public_fd: int, dst_set: int, p: str) -> None:
    """r7 holds an IPv4 destination.  Redirect loopback ones to the guest's
    loopback (stored into the context at dst_set), and leave the source in
    r9; jump to p+'deny' when the guest has no address to send from."""
    a.jif(R7, "==", p + "redirect", imm=0)
    _unless_127(a, R7, p + "external")
    _mapped(a, S_KEY, R7)
    _lookup(a, addrs_fd, S_KEY)
    a.jif(R0, "==", p + "not_own", wide=True)
    a.mov(R9, R7)  # the guest's own 127/8 address: talk from it
    a.jmp(p + "src_ok")
    a.label(p + "not_own")
    _lookup(a, public_fd, S_KEY)
    a.jif(R0, "!=", p + "external", wide=True)  # another guest's public 127/8 address
    a.label(p + "redirect")
    a.load(4, R1, R8, C_LO4)
    a.mov(R7, R1)
    a.store(4, R6, dst_set, R1)
    a.mov(R9, R7)
    a.jmp(p + "src_ok")
    a.label(p + "external")
    a.load(4, R9, R8, C_PRIMARY4)
    a.jif(R9, "!=", p + "src_ok", imm=0)
    a.load(4, R9, R8, C_LO4)  # no IPv4 address of its own: only its loopback
    _unless_127(a, R7, p + "deny")
    a.label(p + "src_ok")


def _bind_src(a: Asm, family: int) -> None:
    """bpf_bind(ctx, the source slot, port 0): the connection leaves from the
    guest's address.  Fails harmlessly on a socket the guest bound itself."""
    for off in range(S_SA, S_SA + 32, 8):
        a.store_imm(8, FP, off, 0)
    a.store_imm(2, FP, S_SA, family)
    if family == AF_INET:
        a.load(4, R1, FP, S_SRC + 12)
        a.store(4, FP, S_SA + 4, R1)
        size = 16
    else:
        _copy16(a, FP, S_SA + 8, FP, S_SRC)
        size = 28
    a.mov(R1, R6)
    a.mov(R2, FP)
    a.alu("add", R2, imm=S_SA)
    a.mov(R3, imm=size)
    a.call(FUNC_BIND)


# --- the programs ------------------------------------------------------------------------


def bind4(conf: int, addrs: int, public: int) -> Asm:
    a = Asm()
    _prologue(a, conf, 0)
    a.load(4, R7, R6, USER_IP4)
    _mapped(a, S_KEY, R7)
    _lookup(a, addrs, S_KEY)
    a.jif(R0, "!=", "allow", wide=True)
    a.jif(R7, "==", "wild", imm=0)
    _unless_127(a, R7, "deny")
    _lookup(a, public, S_KEY)
    a.jif(R0, "!=", "deny", wide=True)  # another guest's address
    a.jmp("loop")
    a.label("wild")
    a.load(4, R1, R8, C_PRIMARY4)
    a.jif(R1, "!=", "set", imm=0)
    a.label("loop")
    a.load(4, R1, R8, C_LO4)
    a.label("set")
    a.store(4, R6, USER_IP4, R1)
    a.label("allow")
    a.ret(3)  # allowed, and no CAP_NET_BIND_SERVICE check
    a.label("deny")
    a.ret(0)
    return a


def bind6(conf: int, addrs: int, public: int) -> Asm:
    a = Asm()
    _prologue(a, conf, 0)
    _copy16(a, FP, S_KEY, R6, USER_IP6)
    _lookup(a, addrs, S_KEY)
    a.jif(R0, "!=", "allow", wide=True)
    a.load(4, R1, FP, S_KEY)
    a.load(4, R2, FP, S_KEY + 4)
    a.alu("or", R1, R2)
    a.jif(R1, "!=", "deny", wide=True)
    a.load(4, R3, FP, S_KEY + 8)
    a.load(4, R4, FP, S_KEY + 12)
    a.jif(R3, "==", "mapped", imm=MAPPED)
    a.jif(R3, "!=", "deny", imm=0)
    a.jif(R4, "==", "wild6", imm=0)
    a.jif(R4, "==", "loop6", imm=LOOP6)
    a.label("deny")
    a.ret(0)
    # ::ffff:a.b.c.d: the IPv4 rules
    a.label("mapped")
    a.jif(R4, "==", "m_wild", imm=0)
    _unless_127(a, R4, "deny")
    _lookup(a, public, S_KEY)
    a.jif(R0, "!=", "deny", wide=True)
    a.jmp("m_loop")
    a.label("m_wild")
    a.load(4, R1, R8, C_PRIMARY4)
    a.jif(R1, "!=", "m_set", imm=0)
    a.label("m_loop")
    a.load(4, R1, R8, C_LO4)
    a.label("m_set")
    a.store(4, R6, USER_IP6 + 12, R1)
    a.ret(3)
    # [::]: the primary IPv6 address, else the primary IPv4 one v4-mapped
    a.label("wild6")
    a.load(4, R1, R8, C_HAS6)
    a.jif(R1, "==", "wild6_v4", imm=0)
    _copy16(a, R6, USER_IP6, R8, C_PRIMARY6)
    a.ret(3)
    a.label("wild6_v4")
    a.mov32(R2, MAPPED)
    a.store(4, R6, USER_IP6 + 8, R2)
    a.jmp("m_wild")
    a.label("loop6")
    a.load(4, R1, R8, C_HASLO6)
    a.jif(R1, "==", "deny", imm=0)
    _copy16(a, R6, USER_IP6, R8, C_LO6)
    a.label("allow")
    a.ret(3)
    return a


def _out4(conf: int, addrs: int, public: int, sendmsg: bool) -> Asm:
    """connect4 and sendmsg4: destination rules, then the source."""
    a = Asm()
    _prologue(a, conf, 0)
    a.load(4, R7, R6, USER_IP4)
    _classify4(a, addrs, public, USER_IP4, "")
    if sendmsg:
        a.load(8, R1, R6, SK)
        a.load(4, R2, R1, SK_SRC_IP4)
        a.jif(R2, "!=", "done", imm=0)  # bound: the bind rules chose its address
        a.store(4, R6, MSG_SRC_IP4, R9)
    else:
        _mapped(a, S_SRC, R9)
        _bind_src(a, AF_INET)
    a.label("done")
    a.ret(1)
    a.label("deny")
    a.ret(0)
    return a


def _out6(conf: int, addrs: int, public: int, sendmsg: bool) -> Asm:
    """connect6 and sendmsg6: IPv6 destinations, and v4-mapped ones by the IPv4 rules."""
    a = Asm()
    _prologue(a, conf, 0)
    _copy16(a, FP, S_KEY, R6, USER_IP6)
    a.load(4, R1, FP, S_KEY)
    a.load(4, R2, FP, S_KEY + 4)
    a.jif(R1, "!=", "not_lo6", imm=_LO6_A)
    a.jif(R2, "==", "redirect6", imm=_LO6_B)  # some guest's IPv6 loopback
    a.label("not_lo6")
    a.alu("or", R1, R2)
    a.jif(R1, "!=", "external6", wide=True)
    a.load(4, R3, FP, S_KEY + 8)
    a.load(4, R4, FP, S_KEY + 12)
    a.jif(R3, "==", "mapped", imm=MAPPED)
    a.jif(R3, "!=", "external6", imm=0)
    a.jif(R4, "==", "redirect6", imm=0)
    a.jif(R4, "==", "redirect6", imm=LOOP6)
    a.label("external6")
    a.load(4, R1, R8, C_HAS6)
    a.jif(R1, "==", "deny", imm=0)
    _copy16(a, FP, S_SRC, R8, C_PRIMARY6)
    a.jmp("src_ok")
    a.label("redirect6")
    a.load(4, R1, R8, C_HASLO6)
    a.jif(R1, "==", "deny", imm=0)
    _copy16(a, R6, USER_IP6, R8, C_LO6)
    _copy16(a, FP, S_SRC, R8, C_LO6)
    a.jmp("src_ok")
    a.label("mapped")
    a.mov(R7, R4)
    _classify4(a, addrs, public, USER_IP6 + 12, "m_")
    _mapped(a, S_SRC, R9)
    a.label("src_ok")
    if sendmsg:
        a.load(8, R1, R6, SK)
        a.load(4, R2, R1, SK_SRC_IP6)
        a.load(4, R3, R1, SK_SRC_IP6 + 4)
        a.alu("or", R2, R3)
        a.load(4, R3, R1, SK_SRC_IP6 + 8)
        a.alu("or", R2, R3)
        a.load(4, R3, R1, SK_SRC_IP6 + 12)
        a.alu("or", R2, R3)
        a.jif(R2, "!=", "done", wide=True)
        _copy16(a, R6, MSG_SRC_IP6, FP, S_SRC)
    else:
        _bind_src(a, AF_INET6)
    a.label("done")
    a.ret(1)
    a.label("deny")
    a.label("m_deny")
    a.ret(0)
    return a


def _show4(conf: int) -> Asm:
    """getsockname4, getpeername4, recvmsg4: the guest's loopback shows as 127.0.0.1."""
    a = Asm()
    _prologue(a, conf, 1)
    a.load(4, R1, R6, USER_IP4)
    a.load(4, R2, R8, C_LO4)
    a.jif(R1, "!=", "done", src=R2)
    a.mov32(R1, LOCALHOST4)
    a.store(4, R6, USER_IP4, R1)
    a.label("done")
    a.ret(1)
    return a


def _show6(conf: int) -> Asm:
    a = Asm()
    _prologue(a, conf, 1)
    a.load(4, R1, R6, USER_IP6)
    a.load(4, R2, R6, USER_IP6 + 4)
    a.load(4, R3, R6, USER_IP6 + 8)
    a.load(4, R4, R6, USER_IP6 + 12)
    a.mov(R7, R1)
    a.alu("or", R7, R2)
    a.jif(R7, "!=", "lo6", wide=True)
    a.jif(R3, "!=", "lo6", imm=MAPPED)
    a.load(4, R7, R8, C_LO4)
    a.jif(R4, "!=", "done", src=R7)
    a.mov32(R1, LOCALHOST4)
    a.store(4, R6, USER_IP6 + 12, R1)
    a.jmp("done")
    a.label("lo6")
    a.load(4, R7, R8, C_HASLO6)
    a.jif(R7, "==", "done", imm=0)
    for i, reg in enumerate((R1, R2, R3, R4)):
        a.load(4, R7, R8, C_LO6 + 4 * i)
        a.jif(reg, "!=", "done", src=R7)
    a.mov32(R1, 0)
    a.store(4, R6, USER_IP6, R1)
    a.store(4, R6, USER_IP6 + 4, R1)
    a.store(4, R6, USER_IP6 + 8, R1)
    a.mov32(R1, LOOP6)
    a.store(4, R6, USER_IP6 + 12, R1)
    a.label("done")
    a.ret(1)
    return a


def sock_create() -> Asm:
    a = Asm()
    a.load(4, R1, R1, SOCK_TYPE)
    a.jif(R1, "==", "deny", imm=SOCK_RAW)
    a.ret(1)
    a.label("deny")
    a.ret(0)
    return a


# --- a netns guest's packets ----------------------------------------------------------

TC_ACT_OK, TC_ACT_SHOT = 0, 2
ETH_HLEN, IP6_HLEN = 14, 40
ETH_P_IPV6 = 0xDD86  # htons(0x86DD) as a 2-byte load sees it
SKB_DATA, SKB_DATA_END = 76, 80  # struct __sk_buff


def source_guard6(allowed: list[ipaddress.IPv6Address]) -> Asm:
    """A tc program for the host end of a routed netns guest's veth (its
    ingress: what the guest sends): an IPv6 packet passes only from one of
    the guest's addresses, a link-local one (neighbour discovery) or ::
    (duplicate address detection).  IPv6 has no rp_filter; IPv4 has, and
    everything else passes.  The addresses are part of the program: a netns
    guest's change of address is a reboot."""
    a = Asm()
    a.load(4, R2, R1, SKB_DATA)
    a.load(4, R3, R1, SKB_DATA_END)
    a.mov(R4, R2)
    a.alu("add", R4, imm=ETH_HLEN)
    a.jif(R4, ">", "pass", src=R3, wide=True)  # not even a frame: the stack drops it
    a.load(2, R4, R2, 12)  # the ethertype
    a.jif(R4, "!=", "pass", imm=ETH_P_IPV6)  # ARP and IPv4 (whose sources rp_filter checks)
    a.mov(R4, R2)
    a.alu("add", R4, imm=ETH_HLEN + IP6_HLEN)
    a.jif(R4, ">", "short", src=R3, wide=True)
    words = (R6, R7, R8, R9)  # the source address, 4 words from offset 8 of the IPv6 header
    for i, reg in enumerate(words):
        a.load(4, reg, R2, ETH_HLEN + 8 + 4 * i)
    a.mov(R4, R6)
    a.alu("and", R4, imm=0xC0FF)  # fe80::/10
    a.jif(R4, "==", "pass", imm=0x80FE)
    for i, addr in enumerate(allowed):
        for reg, w in zip(words, struct.unpack("<4I", addr.packed), strict=True):
            a.jif(reg, "!=", f"not{i}", imm=w)
        a.jmp("pass")
        a.label(f"not{i}")
    for reg in words:
        a.jif(reg, "!=", "drop", imm=0)
    a.label("pass")
    a.ret(TC_ACT_OK)
    a.label("short")  # IPv6 shorter than its header
    a.label("drop")
    a.ret(TC_ACT_SHOT)
    return a


@dataclass(frozen=True)
class Program:
    name: str
    prog_type: int
    attach_type: int
    asm: Asm


def programs(conf: int, addrs: int, public: int) -> list[Program]:
    """Every program of an isolated guest, for maps conf, addrs and public (fds)."""
    sa = PROG_CGROUP_SOCK_ADDR
    return [
        Program("vctx_sock", PROG_CGROUP_SOCK, INET_SOCK_CREATE, sock_create()),
        Program("vctx_bind4", sa, INET4_BIND, bind4(conf, addrs, public)),
        Program("vctx_bind6", sa, INET6_BIND, bind6(conf, addrs, public)),
        Program("vctx_connect4", sa, INET4_CONNECT, _out4(conf, addrs, public, sendmsg=False)),
        Program("vctx_connect6", sa, INET6_CONNECT, _out6(conf, addrs, public, sendmsg=False)),
        Program("vctx_sendmsg4", sa, UDP4_SENDMSG, _out4(conf, addrs, public, sendmsg=True)),
        Program("vctx_sendmsg6", sa, UDP6_SENDMSG, _out6(conf, addrs, public, sendmsg=True)),
        Program("vctx_recvmsg4", sa, UDP4_RECVMSG, _show4(conf)),
        Program("vctx_recvmsg6", sa, UDP6_RECVMSG, _show6(conf)),
        Program("vctx_sockname4", sa, INET4_GETSOCKNAME, _show4(conf)),
        Program("vctx_sockname6", sa, INET6_GETSOCKNAME, _show6(conf)),
        Program("vctx_peername4", sa, INET4_GETPEERNAME, _show4(conf)),
        Program("vctx_peername6", sa, INET6_GETPEERNAME, _show6(conf)),
    ]
