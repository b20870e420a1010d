"""A guest's cgroups on cgroup v1, v2 or both, behind one interface.

Hosts come in two layouts:

- pure v2 (most hosts today): one hierarchy at /sys/fs/cgroup with the
  controllers enabled down to vctx/GUEST;
- hybrid: v1 hierarchies per controller (/sys/fs/cgroup/memory, ...) with a
  controller-less v2 hierarchy at /sys/fs/cgroup/unified.

A guest always gets a v2 node (vctx/GUEST): cgroup.kill, cgroup.events and
the network BPF programs live there, and it is delegated to the guest's root
so the guest's systemd can manage its own subtree.  Limits go wherever the
controller is: v2 files on a pure v2 host, v1 files on a hybrid one.
Which controllers exist is read from the hierarchy itself (cgroup.controllers,
the v1 mounts), so the same code runs against a fake tree in tests.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from . import errors
from .config import Limits, parse_size

BASE = Path("/sys/fs/cgroup")
PARENT = "vctx"
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "cpuset", "pids", "blkio", "devices", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "cpuset", "pids", "io")
PERIOD_US = 100_000
# The harmless devices (VServer's list), for the v1 devices controller.
DEVICES_ALLOW = (
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
)


@dataclass(frozen=True)
class Layout:
    v2: Path | None  # the v2 hierarchy's root
    v2_controllers: frozenset[str]  # enabled for use in v2
    v1: dict[str, Path] = field(default_factory=dict)  # controller -> its v1 hierarchy

    @property
    def pure_v2(self) -> bool:
        return not self.v1 and self.v2 is not None

    def describe(self) -> str:
        if self.pure_v2:
            return f"v2 at {self.v2} ({' '.join(sorted(self.v2_controllers)) or 'no controllers'})"
        v2 = f", v2 at {self.v2}" if self.v2 else ""
        return f"v1 ({' '.join(sorted(self.v1))}){v2}"


def detect(base: Path = BASE) -> Layout:
    if (base / "cgroup.controllers").exists():
        return Layout(base, frozenset((base / "cgroup.controllers").read_text().split()))
    v1 = {c: base / c for c in V1_CONTROLLERS if (base / c / "cgroup.procs").exists()}
    v2 = base / "unified" if (base / "unified" / "cgroup.procs").exists() else None
    ctl = (
        frozenset((v2 / "cgroup.controllers").read_text().split())
        if v2 and (v2 / "cgroup.controllers").exists()
        else frozenset()
    )
    return Layout(v2, ctl - set(v1), v1)


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {value!r} to {path}: {e.strerror}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


# vctxd's own node at each hierarchy's root (a name no guest can have: guests
# live under vctx/).
DAEMON = "vctxd"


def move_daemon(pid: int, layout: Layout | None = None) -> list[Path]:
    """Put vctxd (pid) into a cgroup of its own in every hierarchy.

    Started by the first `vctx boot`, it would otherwise stay in that
    command's cgroup: a login session's scope, which logind kills at logout
    and systemd at `systemctl stop` — and with it the cowfs mounts of every
    guest.  Returns the nodes it is in.
    """
    lay = layout or detect()
    nodes: list[Path] = []
    roots = [*([lay.v2] if lay.v2 else []), *{r.resolve(): r for r in lay.v1.values()}.values()]
    for root in roots:
        node = root / DAEMON
        node.mkdir(exist_ok=True)
        if root.resolve() == lay.v1.get("cpuset", Path("/nonexistent")).resolve():
            GuestCgroups._cpuset_init(node)
        _write(node / "cgroup.procs", str(pid))
        nodes.append(node)
    return nodes


class GuestCgroups:
    def __init__(self, name: str, layout: Layout | None = None) -> None:
        self.name = name
        self.layout = layout or detect()
        lay = self.layout
        self.v2 = lay.v2 / PARENT / name if lay.v2 else None
        # cpu and cpuacct are often one hierarchy mounted twice: keep one path each
        seen: dict[Path, str] = {}
        self.v1: dict[str, Path] = {}
        for c, root in lay.v1.items():
            real = root.resolve()
            if real in seen:
                continue
            seen[real] = c
            self.v1[c] = root / PARENT / name

    # --- where a controller lives ---------------------------------------------------

    def node_for(self, ctl: str) -> Path | None:
        """The node holding ctl's files, or None if the host has no such controller."""
        if ctl in self.layout.v1:
            root = self.layout.v1[ctl]
            return root / PARENT / self.name
        if self.v2 is not None and ctl in self.layout.v2_controllers:
            return self.v2
        return None

    def nodes(self) -> list[Path]:
        return [*([self.v2] if self.v2 else []), *self.v1.values()]

    def exists(self) -> bool:
        return any(p.is_dir() for p in self.nodes())

    # --- life cycle ------------------------------------------------------------------

    def create(self, limits: Limits, owner: int | None = None) -> None:
        """Make the nodes, apply limits; refuse limits the host cannot apply.

        Everything made is removed again if any step fails.
        """
        self.check(limits)
        try:
            self._mkdirs()
            self.apply(limits)
            if owner is not None and self.v2 is not None:
                # Delegation: the guest's root may manage the subtree (systemd does).
                for f in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
                    p = self.v2 / f if f else self.v2
                    if p.exists():
                        os.chown(p, owner, owner)
        except BaseException:
            self.remove()
            raise

    def _mkdirs(self) -> None:
        lay = self.layout
        if lay.v2 is not None:
            parent = lay.v2 / PARENT
            parent.mkdir(exist_ok=True)
            if lay.pure_v2:
                want = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in lay.v2_controllers)
                if want:
                    for d in (lay.v2, parent):
                        _write(d / "cgroup.subtree_control", want)
            assert self.v2 is not None
            self.v2.mkdir()
        for c, node in self.v1.items():
            parent = node.parent
            parent.mkdir(exist_ok=True)
            if c == "cpuset":  # v1 cpuset cgroups start empty: nothing could run in them
                self._cpuset_init(parent)
            node.mkdir()
            if c == "cpuset":
                self._cpuset_init(node)
            if c == "devices":
                _write(node / "devices.deny", "a")
                for rule in DEVICES_ALLOW:
                    _write(node / "devices.allow", rule)

    @staticmethod
    def _cpuset_init(d: Path) -> None:
        for f in ("cpuset.cpus", "cpuset.mems"):
            if not _read(d / f).strip():
                _write(d / f, _read(d.parent / f).strip())

    def check(self, limits: Limits) -> None:
        wants = {
            "memory": limits.memory is not None or limits.swap is not None,
            "cpu": limits.cpus is not None or limits.cpu_weight is not None,
            "cpuset": limits.cpuset is not None,
            "pids": limits.pids is not None,
            "io": limits.io_weight is not None,
        }
        for ctl, want in wants.items():
            if want and self.node_for("blkio" if ctl == "io" and "blkio" in self.layout.v1 else ctl) is None:
                raise errors.HostLacks(f"this host has no {ctl} cgroup controller: remove the {ctl} limit")
        if limits.swap is not None:
            mem = self.node_for("memory")
            assert mem is not None
            f = "memory.swap.max" if "memory" not in self.layout.v1 else "memory.memsw.limit_in_bytes"
            probe = mem.parent / f
            if not probe.exists():
                raise errors.HostLacks(f"this host cannot limit swap ({f} is missing; boot with swapaccount=1)")
            if "memory" in self.layout.v1 and limits.memory is None:
                raise errors.HostLacks("on cgroup v1 a swap limit needs a memory limit too")

    def apply(self, limits: Limits) -> None:
        v1 = self.layout.v1
        if limits.memory is not None or limits.swap is not None:
            node = self.node_for("memory")
            assert node is not None
            mem = parse_size(limits.memory, "memory") if limits.memory is not None else None
            swap = parse_size(limits.swap, "swap") if limits.swap is not None else None
            if "memory" in v1:
                if mem is not None:
                    _write(node / "memory.limit_in_bytes", str(mem))
                if swap is not None and mem is not None:
                    _write(node / "memory.memsw.limit_in_bytes", str(mem + swap))
            else:
                _write(node / "memory.max", "max" if mem is None else str(mem))
                if swap is not None:
                    _write(node / "memory.swap.max", str(swap))
        if limits.cpus is not None or limits.cpu_weight is not None:
            node = self.node_for("cpu")
            assert node is not None
            quota = int(limits.cpus * PERIOD_US) if limits.cpus is not None else None
            if "cpu" in v1:
                if quota is not None:
                    _write(node / "cpu.cfs_period_us", str(PERIOD_US))
                    _write(node / "cpu.cfs_quota_us", str(quota))
                if limits.cpu_weight is not None:
                    _write(node / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)))
            else:
                if quota is not None:
                    _write(node / "cpu.max", f"{quota} {PERIOD_US}")
                if limits.cpu_weight is not None:
                    _write(node / "cpu.weight", str(limits.cpu_weight))
        if limits.cpuset is not None:
            node = self.node_for("cpuset")
            assert node is not None
            _write(node / "cpuset.cpus", limits.cpuset)
        if limits.pids is not None:
            node = self.node_for("pids")
            assert node is not None
            _write(node / "pids.max", str(limits.pids))
        if limits.io_weight is not None:
            if "blkio" in v1:
                node = v1["blkio"] / PARENT / self.name
                w = min(1000, max(10, limits.io_weight // 10))
                for f in ("blkio.weight", "blkio.bfq.weight"):
                    if (node / f).exists():
                        _write(node / f, str(w))
                        break
                else:
                    raise errors.HostLacks("this host's block layer has no IO weights (no BFQ scheduler)")
            else:
                node = self.node_for("io")
                assert node is not None
                _write(node / "io.weight", f"default {limits.io_weight}")

    def add(self, pid: int) -> None:
        for node in self.nodes():
            _write(node / "cgroup.procs", str(pid))

    # --- what is in it ----------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process of the guest, from the v2 subtree (or a v1 hierarchy)."""
        top = self.v2 if self.v2 is not None else next(iter(self.v1.values()), None)
        out: list[int] = []
        if top is None or not top.is_dir():
            return out
        for d, _, _ in os.walk(top):
            out.extend(int(x) for x in _read(Path(d) / "cgroup.procs").split())
        return out

    def populated(self) -> bool:
        if self.v2 is not None and (self.v2 / "cgroup.events").exists():
            for line in _read(self.v2 / "cgroup.events").splitlines():
                k, _, v = line.partition(" ")
                if k == "populated":
                    return v.strip() == "1"
        return bool(self.pids())

    def kill(self) -> None:
        """SIGKILL every process: cgroup.kill where the kernel has it (one
        atomic write, forks cannot escape), else signal each pid until none is left."""
        if self.v2 is not None and (self.v2 / "cgroup.kill").exists():
            _write(self.v2 / "cgroup.kill", "1")
            return
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def signal_all(self, sig: int) -> int:
        n = 0
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
        return n

    def remove(self) -> None:
        """rmdir every node, children first (the guest may have made some)."""
        for node in self.nodes():
            if not node.is_dir():
                continue
            for d, _, _ in sorted(os.walk(node), key=lambda t: -len(t[0])):
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.ENOENT,):
                        raise

    def stats(self) -> dict[str, int]:
        """Usage and refusal counters: cpu (us), memory (bytes), pids, hits."""
        out: dict[str, int] = {}
        if self.v2 is not None:
            for line in _read(self.v2 / "cpu.stat").splitlines():
                k, _, v = line.partition(" ")
                if k in ("usage_usec", "user_usec", "system_usec"):
                    out[k] = int(v)
        if "user_usec" not in out and "cpuacct" in self.layout.v1:
            hz = os.sysconf("SC_CLK_TCK")
            for line in _read(self.layout.v1["cpuacct"] / PARENT / self.name / "cpuacct.stat").splitlines():
                k, _, v = line.partition(" ")
                if k in ("user", "system"):
                    out[f"{k}_usec"] = int(v) * 1_000_000 // hz
        mem = self.node_for("memory")
        if mem is not None:
            f = "memory.usage_in_bytes" if "memory" in self.layout.v1 else "memory.current"
            if (mem / f).exists():
                out["memory"] = int(_read(mem / f) or 0)
            if "memory" in self.layout.v1:
                out["memory_hits"] = int(_read(mem / "memory.failcnt") or 0)
            else:
                for line in _read(mem / "memory.events").splitlines():
                    k, _, v = line.partition(" ")
                    if k in ("max", "oom_kill"):
                        out[f"memory_{k}"] = int(v)
        pids = self.node_for("pids")
        if pids is not None:
            out["pids"] = int(_read(pids / "pids.current") or 0)
            for line in _read(pids / "pids.events").splitlines():
                k, _, v = line.partition(" ")
                if k == "max":
                    out["pids_hits"] = int(v)
        return out
