"""A guest's configuration: one TOML file, validated on load.

Limits are written as people think of them (memory = "512M", cpus = 1.5,
pids = 512) and checked here, once, so nothing later meets a bad value.
Unknown keys are refused: a typo must not silently drop a limit.
"""

from __future__ import annotations

import ipaddress
import re
import resource
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from . import errors, seccomp
from .files import write_atomic
from .home import check_name

VERSION = 1
INITS = ("systemd", "sysvinit", "busybox", "plain")
NETWORKS = ("isolated", "netns", "none", "host")
# cowfs: the guest's tree is hard links to its template, served by cowfs;
# plain: a private copy, bind-mounted with the guest's ids (no FUSE at all).
ROOTS = ("cowfs", "plain")
PAGE_CACHES = ("shared", "private")  # cowfs: FUSE passthrough for shared files, or each mount its own
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_CPUSET = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def parse_size(value: object, key: str) -> int | None:
    """'512M', '2G', 1048576, 'max' -> bytes (None: unlimited)."""
    if isinstance(value, bool):
        raise errors.BadConfig(f"{key}: expected a size like 512M, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise errors.BadConfig(f"{key}: a size cannot be negative")
        return value
    if isinstance(value, str):
        if value.lower() in ("max", "unlimited", "none"):
            return None
        m = _SIZE.fullmatch(value.strip())
        if m:
            mult = 1024 ** " KMGT".index(m.group(2).upper() or " ")
            return int(float(m.group(1)) * mult)
    raise errors.BadConfig(f"{key}: expected a size like 512M, 2G or max, got {value!r}")


@dataclass
class Limits:
    memory: str | None = None  # RAM; swap below is on top of it
    swap: str | None = None
    cpus: float | None = None  # CPU time quota, in CPUs
    cpu_weight: int | None = None  # 1..10000, 100 is the default share
    cpuset: str | None = None
    pids: int | None = None
    io_weight: int | None = None  # 1..10000

    def check(self) -> None:
        for k in ("memory", "swap"):
            v = getattr(self, k)
            if v is not None:
                parse_size(v, f"limits.{k}")
        if self.cpus is not None and not (isinstance(self.cpus, int | float) and 0.01 <= self.cpus <= 4096):
            raise errors.BadConfig(f"limits.cpus: expected a number of CPUs like 1.5, got {self.cpus!r}")
        for k in ("cpu_weight", "io_weight"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, int) and 1 <= v <= 10000):
                raise errors.BadConfig(f"limits.{k}: expected 1..10000, got {v!r}")
        if self.pids is not None and not (isinstance(self.pids, int) and self.pids > 0):
            raise errors.BadConfig(f"limits.pids: expected a positive number, got {self.pids!r}")
        if self.cpuset is not None and not (isinstance(self.cpuset, str) and _CPUSET.fullmatch(self.cpuset)):
            raise errors.BadConfig(f"limits.cpuset: expected CPUs like 0-1,3, got {self.cpuset!r}")


@dataclass
class Net:
    """How the guest reaches the network (netctx.py does it).

    ip: its addresses, "ADDR" or "ADDR/PREFIX" (IPv4 and IPv6, several; the
    first of each family is the primary one).  interface: the host interface
    they are added to in isolated mode ("" = lo for loopback addresses, else
    the interface of the host's default route).  bridge, gateway: netns mode
    attached to a host bridge instead of routed point-to-point.
    """

    mode: str = "isolated"
    ip: list[str] = field(default_factory=list)
    interface: str = ""
    bridge: str = ""
    gateway: str = ""

    def check(self) -> None:
        if self.mode not in NETWORKS:
            raise errors.BadConfig(f"net.mode: expected one of {', '.join(NETWORKS)}, got {self.mode!r}")
        if not isinstance(self.ip, list) or not all(isinstance(a, str) for a in self.ip):
            raise errors.BadConfig("net.ip: expected a list of addresses")
        seen = set()
        for a in self.ip:
            iface = parse_ip(a)
            if iface.ip in seen:
                raise errors.BadConfig(f"net.ip: {iface.ip} is given twice")
            seen.add(iface.ip)
        for k in ("interface", "bridge"):
            v = getattr(self, k)
            if not isinstance(v, str) or len(v) > 15 or "/" in v or v in (".", ".."):
                raise errors.BadConfig(f"net.{k}: {v!r} is not an interface name")
        if self.gateway:
            try:
                ipaddress.ip_address(self.gateway)
            except ValueError:
                raise errors.BadConfig(f"net.gateway: {self.gateway!r} is not an address") from None
        if (self.bridge or self.gateway) and self.mode != "netns":
            raise errors.BadConfig('net.bridge and net.gateway are for network = "netns"')

    def addresses(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        return [parse_ip(a) for a in self.ip]


def parse_ip(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """'192.0.2.7', '192.0.2.7/24', 'fd00::7' -> an address with its prefix (host-sized if none)."""
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise errors.BadConfig(f"{text!r} is not an IP address") from None
    a = iface.ip
    if a.is_unspecified or a.is_multicast or (isinstance(a, ipaddress.IPv6Address) and a.is_loopback):
        raise errors.BadConfig(f"{a} cannot be a guest's address")
    if isinstance(a, ipaddress.IPv4Address) and a == ipaddress.IPv4Address("127.0.0.1"):
        raise errors.BadConfig("127.0.0.1 is every guest's own loopback, not an address to give one")
    if "/" in text and iface.network.prefixlen < iface.max_prefixlen and a == iface.network.network_address:
        raise errors.BadConfig(f"{text!r} is a network, not an address in it")
    return iface


# rlimits a guest's config may set (guest.toml [rlimits], vctx set rlimit.NAME=...).
RLIMITS = {
    name: getattr(resource, f"RLIMIT_{name.upper()}")
    for name in (
        "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue",
        "nice", "nofile", "nproc", "rss", "rtprio", "stack",
    )
    if hasattr(resource, f"RLIMIT_{name.upper()}")
}  # fmt: skip


def parse_bool(value: str, key: str) -> bool:
    """yes/no, true/false, on/off, 1/0, as `vctx set` takes them."""
    v = value.strip().lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0", ""):
        return False
    raise errors.BadConfig(f"{key}: expected yes or no, got {value!r}")


def parse_rlimit(name: str, value: object) -> tuple[int, int]:
    """4096, "1024:4096", "unlimited" -> (soft, hard); sizes may be written 8M."""
    if name not in RLIMITS:
        raise errors.BadConfig(f"rlimits: unknown limit {name!r} (known: {', '.join(sorted(RLIMITS))})")

    def one(v: object) -> int:
        if isinstance(v, str) and v.strip().lower() in ("unlimited", "infinity", "max"):
            return resource.RLIM_INFINITY
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        size = parse_size(v, f"rlimits.{name}")
        return resource.RLIM_INFINITY if size is None else size

    if isinstance(value, str) and ":" in value:
        soft_text, _, hard_text = value.partition(":")
        soft, hard = one(soft_text), one(hard_text)
    else:
        soft = hard = one(value)
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
        raise errors.BadConfig(f"rlimits.{name}: the soft limit is above the hard one in {value!r}")
    return soft, hard


@dataclass
class GuestConfig:
    name: str
    template: str
    init: str
    id_base: int
    id_size: int = 65536
    hostname: str = ""
    command: list[str] = field(default_factory=list)  # for init = "plain"
    limits: Limits = field(default_factory=Limits)
    net: Net = field(default_factory=Net)
    rlimits: dict[str, str | int] = field(default_factory=dict)
    root: str = "cowfs"
    page_cache: str = "shared"
    allow_syscalls: list[str] = field(default_factory=list)  # of those seccomp.py refuses; from the next boot
    autostart: bool = False  # booted by `vctx boot --autostart` (the host's vctx.service)
    version: int = VERSION

    def check(self) -> None:
        check_name(self.name)
        if self.version != VERSION:
            raise errors.BadConfig(f"version {self.version!r} is not supported (this vctx writes {VERSION})")
        if self.init not in INITS:
            raise errors.BadConfig(f"init: expected one of {', '.join(INITS)}, got {self.init!r}")
        if self.root not in ROOTS:
            raise errors.BadConfig(f"root: expected one of {', '.join(ROOTS)}, got {self.root!r}")
        if self.page_cache not in PAGE_CACHES:
            raise errors.BadConfig(f"page_cache: expected one of {', '.join(PAGE_CACHES)}, got {self.page_cache!r}")
        if self.init == "plain" and not self.command:
            raise errors.BadConfig('init = "plain" needs command = ["program", "arg", ...]')
        if not (isinstance(self.id_base, int) and self.id_base > 0 and self.id_base + self.id_size <= 2**32 - 1):
            raise errors.BadConfig(f"id_base: {self.id_base!r} is not a usable id range start")
        if not self.hostname:
            self.hostname = self.name
        if not isinstance(self.autostart, bool):
            raise errors.BadConfig(f"autostart: expected true or false, got {self.autostart!r}")
        self.limits.check()
        self.net.check()
        if not isinstance(self.rlimits, dict):
            raise errors.BadConfig("rlimits: expected a table")
        for k, v in self.rlimits.items():
            parse_rlimit(k, v)
        if not isinstance(self.allow_syscalls, list) or not all(isinstance(n, str) for n in self.allow_syscalls):
            raise errors.BadConfig("allow_syscalls: expected a list of system call names")
        try:
            seccomp.check_allowed(self.allow_syscalls)
        except ValueError as e:
            raise errors.BadConfig(f"allow_syscalls: {e}") from None

    def resource_limits(self) -> dict[int, tuple[int, int]]:
        return {RLIMITS[k]: parse_rlimit(k, v) for k, v in self.rlimits.items()}

    def to_toml(self) -> dict[str, Any]:
        def clean(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in d.items() if v is not None}

        out: dict[str, Any] = {"version": self.version}
        for f in fields(self):
            if f.name in ("version", "limits", "net", "rlimits") or (
                f.name == "allow_syscalls" and not self.allow_syscalls
            ):
                continue
            out[f.name] = getattr(self, f.name)
        out["limits"] = clean(self.limits.__dict__)
        out["net"] = clean(self.net.__dict__)
        if self.rlimits:
            out["rlimits"] = dict(self.rlimits)
        return out


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise errors.BadConfig(f"{where}unknown key {unknown[0]!r}")
    return cls(**data)


def from_dict(data: dict[str, Any]) -> GuestConfig:
    data = dict(data)
    if "version" not in data:
        raise errors.BadConfig("no version key")
    if not isinstance(data.get("rlimits", {}), dict):
        raise errors.BadConfig("rlimits: expected a table")
    for k, cls in (("limits", Limits), ("net", Net)):
        sub = data.get(k, {})
        if not isinstance(sub, dict):
            raise errors.BadConfig(f"{k}: expected a table")
        data[k] = _build(cls, sub, f"[{k}] ")
    try:
        cfg: GuestConfig = _build(GuestConfig, data, "")
    except TypeError as e:  # a required key is missing
        raise errors.BadConfig(str(e).split("__init__() ")[-1]) from None
    cfg.check()
    return cfg


def load(path: Path) -> GuestConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise errors.NotFound(f"no config at {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise errors.BadConfig(f"{path}: {e}") from None
    try:
        return from_dict(data)
    except errors.BadConfig as e:
        raise errors.BadConfig(f"{path}: {e}") from None


def save(cfg: GuestConfig, path: Path) -> None:
    cfg.check()
    write_atomic(path, tomli_w.dumps(cfg.to_toml()).encode())
