"""A guest's network, in the mode its config names.

- isolated (the default): the host's network namespace, VServer style.  The
  guest's addresses are added to a host interface (netlink), and the
  programs of netprog.py on its cgroup v2 node confine every socket of the
  guest to them.  No virtual device, nothing per packet.
- netns: a network namespace of its own (made by the launcher, owned by the
  guest's user namespace, so guest root may run its own firewall), joined
  to the host by a veth pair: routed point-to-point like OpenVZ's venet
  (the host side answers as 169.254.0.1 / fe80::1, routes each guest
  address to the pair, and drops spoofed sources with rp_filter), or
  enslaved to a named bridge.
- none: a network namespace with loopback only.
- host: the host's network, unconfined; only on explicit request.

What a boot added is recorded in the guest's run directory before it is
added, so a crashed monitor's leftovers are removed by the next cleanup.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bpf, errors, netprog
from . import sys as k
from .config import GuestConfig
from .files import write_atomic
from .home import flocked

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPIface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

BPFFS = Path("/sys/fs/bpf")
PINS = BPFFS / "vctx"
PUBLIC = "public"  # the host-wide map of guests' 127/8 addresses
MAX_ADDRS = 256
GATEWAY4 = ipaddress.IPv4Interface("169.254.0.1/32")
GATEWAY6 = ipaddress.IPv6Interface("fe80::1/64")
IFA_F_NODAD = 0x02
GUEST_IF = "eth0"


def _ipr() -> Any:
    """A netlink socket in this thread's network namespace.  pyroute2 is
    imported here, not at the top: it costs 150 ms, and `vctx exec` never
    needs it."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    return IPRoute()


def run_dir(name: str) -> Path:
    from .monitor import run_dir as rd  # the monitor owns the run directory

    return rd(name)


@dataclass(frozen=True)
class Plan:
    """A guest's network as data: its config, with defaults resolved."""

    name: str
    mode: str
    addrs: tuple[IPIface, ...]
    interface: str  # isolated: where non-loopback addresses go
    lo4: ipaddress.IPv4Address
    lo6: ipaddress.IPv6Address
    host_if: str  # netns: the host end of the veth pair
    bridge: str = ""
    gateway: str = ""

    @property
    def v4(self) -> list[ipaddress.IPv4Address]:
        return [a.ip for a in self.addrs if isinstance(a.ip, ipaddress.IPv4Address)]

    @property
    def v6(self) -> list[ipaddress.IPv6Address]:
        return [a.ip for a in self.addrs if isinstance(a.ip, ipaddress.IPv6Address)]

    @property
    def own_netns(self) -> bool:
        return self.mode in ("netns", "none")

    def conf(self, has_v6: bool = True) -> netprog.Conf:
        return netprog.Conf(
            self.v4[0] if self.v4 else None,
            self.lo4,
            self.v6[0] if self.v6 else None,
            self.lo6 if has_v6 else None,
        )

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "ip": [str(a.ip) for a in self.addrs]}
        if self.mode == "isolated":
            out["interface"] = self.interface or "auto"
            out["loopback"] = [str(self.lo4), str(self.lo6)]
        elif self.mode == "netns":
            out["host_interface"] = self.host_if
            if self.bridge:
                out["bridge"] = self.bridge
        return out


def loopbacks(id_base: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """The guest's own 127.0.0.1 and ::1, from its id range: unique per host."""
    idx = id_base // 65536
    return netprog.LO4_NET[idx], netprog.LO6_NET[idx]


def plan(cfg: GuestConfig) -> Plan:
    lo4, lo6 = loopbacks(cfg.id_base)
    net = cfg.net
    return Plan(
        name=cfg.name,
        mode=net.mode,
        addrs=tuple(net.addresses()),
        interface=net.interface,
        lo4=lo4,
        lo6=lo6,
        host_if=f"vx{cfg.id_base // 65536}",
        bridge=net.bridge,
        gateway=net.gateway,
    )


# --- checks ------------------------------------------------------------------------------


def check_unique(plan_: Plan, others: list[GuestConfig]) -> None:
    """No two guests of a home share an address."""
    mine = {a.ip for a in plan_.addrs}
    for cfg in others:
        if cfg.name == plan_.name:
            continue
        for a in cfg.net.addresses():
            if a.ip in mine:
                raise errors.InUse(f"{a.ip} belongs to guest {cfg.name}")


def check_host(p: Plan, ours: set[IPAddr]) -> None:
    """The interface exists and no address is already the host's (but ours)."""
    if not p.addrs and not p.interface:
        return
    with _ipr() as ipr:
        if p.interface:
            _ifindex(ipr, p.interface)
        if p.bridge:
            _ifindex(ipr, p.bridge)
        _refuse_host_owned(ipr, [a.ip for a in p.addrs], ours)


def _refuse_host_owned(ipr: Any, ips: list[IPAddr], ours: set[IPAddr]) -> None:
    """An address the host already has (and not as this guest's) cannot be the guest's."""
    have = _host_addresses(ipr)
    for ip in ips:
        if ip in have and ip not in ours:
            raise errors.InUse(f"{ip} is already an address of this host")


def _ifindex(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise errors.NotFound(f"the host has no network interface {name!r}")
    return int(found[0])


def _default_interface(ipr: Any) -> str:
    for family in (2, 10):
        for r in ipr.get_default_routes(family=family):
            oif = r.get_attr("RTA_OIF")
            if oif:
                return str(ipr.get_links(oif)[0].get_attr("IFLA_IFNAME"))
    raise errors.BadConfig("no interface given (net.interface) and the host has no default route to pick one")


def _host_addresses(ipr: Any) -> dict[IPAddr, int]:
    out: dict[IPAddr, int] = {}
    for msg in ipr.get_addr():
        a = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if a:
            out[ipaddress.ip_address(a)] = int(msg["index"])
    return out


def _placement(ipr: Any, p: Plan) -> list[tuple[int, IPIface]]:
    """(interface index, address) for each address an isolated guest adds,
    its IPv6 loopback included: loopback addresses on lo, the rest on the
    configured (or default-route) interface."""
    lo = _ifindex(ipr, "lo")
    out: list[tuple[int, IPIface]] = []
    iface_index: int | None = None
    for a in p.addrs:
        if a.ip.is_loopback:
            out.append((lo, ipaddress.ip_interface(f"{a.ip}/{a.max_prefixlen}")))
            continue
        if iface_index is None:
            iface_index = _ifindex(ipr, p.interface or _default_interface(ipr))
        out.append((iface_index, a))
    if ipv6_enabled():
        out.append((lo, ipaddress.IPv6Interface(f"{p.lo6}/128")))
    return out


def ipv6_enabled() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/conf/lo/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


# --- the record of what a boot added --------------------------------------------------


@dataclass
class Record:
    added: list[tuple[int, str]] = field(default_factory=list)  # (ifindex, "addr/prefix")
    public: list[str] = field(default_factory=list)  # hex keys in the public map
    host_if: str = ""
    pins: bool = False

    @staticmethod
    def path(name: str) -> Path:
        return run_dir(name) / "net.json"

    @classmethod
    def load(cls, name: str) -> Record:
        try:
            d = json.loads(cls.path(name).read_text())
        except (OSError, ValueError):
            return cls()
        return cls(
            [(int(i), str(a)) for i, a in d.get("added", [])],
            list(d.get("public", [])),
            d.get("host_if", ""),
            bool(d.get("pins")),
        )

    def ours(self) -> set[IPAddr]:
        """The addresses this record says the guest added (so are not the host's)."""
        return {ipaddress.ip_interface(text).ip for _, text in self.added}

    def save(self, name: str) -> None:
        p = self.path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps(self.__dict__).encode(), durable=False)


def _locked() -> contextlib.AbstractContextManager[None]:
    """One network change at a time on this host: address ownership and
    the public map are shared by all guests."""
    lock = run_dir(name="").parent / ".net.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    return flocked(lock)


# --- BPF maps and programs ---------------------------------------------------------------


def _bpffs() -> None:
    """bpffs at /sys/fs/bpf (systemd hosts have it; others get it here)."""
    if not os.path.ismount(BPFFS):
        k.mount("bpf", str(BPFFS), "bpf", 0, "mode=0700")
    PINS.mkdir(mode=0o700, exist_ok=True)


def _public_map() -> bpf.Map:
    path = str(PINS / PUBLIC)
    try:
        return bpf.Map.open_pinned(path, netprog.KEY_SIZE, 4)
    except FileNotFoundError:
        pass
    m = bpf.Map.create(bpf.MAP_HASH, netprog.KEY_SIZE, 4, 4096, "vctx_public")
    m.pin(path)
    return m


def _guest_maps(name: str, create: bool) -> tuple[bpf.Map, bpf.Map]:
    d = PINS / name
    if create:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(mode=0o700)
        conf = bpf.Map.create(bpf.MAP_ARRAY, 4, netprog.CONF_SIZE, 1, "vctx_conf")
        addrs = bpf.Map.create(bpf.MAP_HASH, netprog.KEY_SIZE, 4, MAX_ADDRS, "vctx_addrs")
        conf.pin(str(d / "conf"))
        addrs.pin(str(d / "addrs"))
        return conf, addrs
    return (
        bpf.Map.open_pinned(str(d / "conf"), 4, netprog.CONF_SIZE),
        bpf.Map.open_pinned(str(d / "addrs"), netprog.KEY_SIZE, 4),
    )


def _fill(p: Plan, conf: bpf.Map, addrs: bpf.Map, public: bpf.Map, rec: Record) -> None:
    """Make the maps say what p says (entries first added, then removed:
    at no moment does the guest lose an address it keeps)."""
    mine: list[IPAddr] = [*p.v4, *p.v6]
    want = {netprog.key(a) for a in mine}
    for kb in want:
        addrs.update(kb, b"\1\0\0\0")
    conf.update(b"\0\0\0\0", p.conf(ipv6_enabled()).pack())
    for kb, _ in addrs.items():
        if kb not in want:
            addrs.delete(kb)
    pub = {netprog.key(a) for a in p.v4 if a.is_loopback}
    for kb in pub:
        public.update(kb, b"\1\0\0\0")
    for hexkey in rec.public:
        if bytes.fromhex(hexkey) not in pub:
            public.delete(bytes.fromhex(hexkey))
    rec.public = sorted(kb.hex() for kb in pub)


def _attach_programs(cgroup: Path, conf: bpf.Map, addrs: bpf.Map, public: bpf.Map) -> None:
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for prog in netprog.programs(conf.fd, addrs.fd, public.fd):
            fd = bpf.load_program(prog.prog_type, prog.attach_type, prog.asm.assemble(), prog.name)
            try:
                bpf.attach(cg, fd, prog.attach_type)
            finally:
                os.close(fd)  # the attachment holds the program
    finally:
        os.close(cg)


def attached(cgroup: Path) -> list[str]:
    """Names of the vctx programs on a cgroup (for status and tests)."""
    out = []
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for prog in netprog.programs(0, 0, 0):
            for pid in bpf.query(cg, prog.attach_type):
                fd = bpf.prog_fd_by_id(pid)
                try:
                    name = bpf.prog_name(fd)
                finally:
                    os.close(fd)
                if name == prog.name:
                    out.append(name)
    finally:
        os.close(cg)
    return out


# --- addresses ------------------------------------------------------------------------------


def _add_addr(ipr: Any, index: int, a: IPIface) -> None:
    flags = IFA_F_NODAD if isinstance(a, ipaddress.IPv6Interface) else 0
    try:
        ipr.addr("add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen, flags=flags)
    except Exception as e:  # pyroute2's NetlinkError
        raise errors.VctxError(f"cannot add {a} to interface {index}: {_nlerr(e)}") from None


def _del_addr(ipr: Any, index: int, a: IPIface) -> None:
    try:
        ipr.addr("del", index=index, address=str(a.ip), prefixlen=a.network.prefixlen)
    except Exception as e:
        if getattr(e, "code", None) not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
            raise errors.VctxError(f"cannot remove {a}: {_nlerr(e)}") from None


def _nlerr(e: Exception) -> str:
    code = getattr(e, "code", None)
    return os.strerror(code) if isinstance(code, int) else str(e)


# --- isolated mode ------------------------------------------------------------------------


def up_isolated(p: Plan, cgroup: Path | None) -> None:
    """Addresses, maps and programs of an isolated guest, before its first process runs."""
    if cgroup is None:
        raise errors.HostLacks("isolated networking needs a cgroup v2 hierarchy (for cgroup BPF)")
    with _locked(), _ipr() as ipr:
        rec = Record.load(p.name)
        placement = _placement(ipr, p)
        _refuse_host_owned(ipr, [a.ip for _, a in placement], rec.ours())
        try:
            _bpffs()
            public = _public_map()
            conf, addrs = _guest_maps(p.name, create=True)
        except OSError as e:
            raise errors.HostLacks(f"cannot set up BPF maps: {e.strerror or e}") from None
        rec.pins = True
        rec.save(p.name)
        try:
            for index, a in placement:
                rec.added.append((index, str(a)))
                rec.save(p.name)
                _add_addr(ipr, index, a)
            _fill(p, conf, addrs, public, rec)
            rec.save(p.name)
            try:
                _attach_programs(cgroup, conf, addrs, public)
            except OSError as e:
                raise errors.HostLacks(f"cannot attach the network programs to {cgroup}: {e.strerror or e}") from None
        finally:
            for m in (conf, addrs, public):
                m.close()


def update_isolated(new: Plan) -> None:
    """A running guest's new addresses: add, switch the maps, remove."""
    with _locked(), _ipr() as ipr:
        rec = Record.load(new.name)
        placement = _placement(ipr, new)
        current = {a for _, a in rec.added}
        _refuse_host_owned(ipr, [a.ip for _, a in placement], rec.ours())
        for index, a in placement:
            if str(a) not in current:
                rec.added.append((index, str(a)))
                rec.save(new.name)
                _add_addr(ipr, index, a)
        public = _public_map()
        conf, addrs = _guest_maps(new.name, create=False)
        try:
            _fill(new, conf, addrs, public, rec)
        finally:
            for m in (conf, addrs, public):
                m.close()
        keep = {(i, str(a)) for i, a in placement}
        for index, text in list(rec.added):
            if (index, text) not in keep:
                _del_addr(ipr, index, ipaddress.ip_interface(text))
                rec.added.remove((index, text))
        rec.save(new.name)


# --- netns mode -------------------------------------------------------------------------------


def up_netns_host(p: Plan, ns_pid: int) -> None:
    """The host's half of a netns guest: the veth pair with its guest end in
    the namespace of ns_pid, and routes to the guest's addresses."""
    with _locked(), _ipr() as ipr:
        rec = Record.load(p.name)
        if not p.bridge:
            _refuse_host_owned(ipr, [a.ip for a in p.addrs], set())
        if ipr.link_lookup(ifname=p.host_if):
            ipr.link("del", ifname=p.host_if)  # a crashed boot's
        rec.host_if = p.host_if
        rec.save(p.name)
        try:
            ipr.link("add", ifname=p.host_if, kind="veth", peer={"ifname": GUEST_IF, "net_ns_pid": ns_pid})
        except Exception as e:
            raise errors.HostLacks(f"cannot create veth pair {p.host_if}: {_nlerr(e)}") from None
        index = _ifindex(ipr, p.host_if)
        if p.bridge:
            ipr.link("set", index=index, master=_ifindex(ipr, p.bridge))
            ipr.link("set", index=index, state="up")
            return
        # Point-to-point: the host end answers for the guest's gateway and
        # takes back only packets from the guest's own addresses: rp_filter
        # for IPv4, a tc program for IPv6 (which has no rp_filter).
        _sysctl(f"net/ipv4/conf/{p.host_if}/rp_filter", "1")
        _guard_sources(ipr, index, p.v6)
        ipr.link("set", index=index, state="up")
        _add_addr(ipr, index, GATEWAY4)
        if p.v6 and ipv6_enabled():
            _add_addr(ipr, index, GATEWAY6)
        for a in p.addrs:
            ipr.route("add", dst=str(a.ip), dst_len=a.max_prefixlen, oif=index, family=2 if a.version == 4 else 10)


def _guard_sources(ipr: Any, index: int, v6: list[ipaddress.IPv6Address]) -> None:
    prog = netprog.source_guard6(v6).assemble()
    try:
        fd = bpf.load_program(bpf.PROG_SCHED_CLS, 0, prog, "vctx_src6")
    except OSError as e:
        raise errors.HostLacks(f"cannot load the IPv6 source guard: {e.strerror}") from None
    try:
        ipr.tc("add", "clsact", index)
        # parent ffff:fff2 is clsact's ingress; direct action: the program's verdict is final
        ipr.tc("add-filter", "bpf", index, ":1", fd=fd, name="vctx_src6", parent="ffff:fff2", direct_action=True)
    except Exception as e:
        raise errors.HostLacks(f"cannot attach the IPv6 source guard (clsact, cls_bpf): {_nlerr(e)}") from None
    finally:
        os.close(fd)  # the filter holds the program


def up_netns_inside(p: Plan) -> None:
    """The guest's half, run by the launcher inside the new namespace (as
    root of the guest's user namespace, which owns it)."""
    with _ipr() as ipr:
        ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
        if p.mode == "none":
            return
        index = _ifindex(ipr, GUEST_IF)
        ipr.link("set", index=index, state="up")
        for a in p.addrs:
            if p.bridge:
                _add_addr(ipr, index, a)
            else:
                _add_addr(ipr, index, ipaddress.ip_interface(f"{a.ip}/{a.max_prefixlen}"))
        if p.bridge:
            if p.gateway:
                ipr.route("add", dst="default", gateway=p.gateway, oif=index)
            return
        if p.v4:
            ipr.route("add", dst=str(GATEWAY4.ip), dst_len=32, oif=index, scope=253)
            ipr.route("add", dst="0.0.0.0", dst_len=0, gateway=str(GATEWAY4.ip), oif=index)
        if p.v6 and ipv6_enabled():
            ipr.route("add", dst="::", dst_len=0, gateway=str(GATEWAY6.ip), oif=index, family=10)


def _sysctl(key: str, value: str) -> None:
    with open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


# --- teardown ------------------------------------------------------------------------------


def down(name: str) -> None:
    """Remove whatever the guest's boot added; safe to call twice, or after a crash."""
    rec = Record.load(name)
    if not (rec.added or rec.public or rec.host_if or rec.pins):
        return
    with _locked(), _ipr() as ipr:
        for index, text in rec.added:
            _del_addr(ipr, index, ipaddress.ip_interface(text))
        if rec.host_if and ipr.link_lookup(ifname=rec.host_if):
            with contextlib.suppress(Exception):
                ipr.link("del", ifname=rec.host_if)
        if rec.public and (PINS / PUBLIC).exists():
            public = _public_map()
            try:
                for hexkey in rec.public:
                    public.delete(bytes.fromhex(hexkey))
            finally:
                public.close()
        if (PINS / name).exists():
            shutil.rmtree(PINS / name)
    Record.path(name).unlink(missing_ok=True)
