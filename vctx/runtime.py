"""Running guests: boot, stop, kill, and what is known about them.

A guest runs when vctxd (daemon.py) holds it and its init is alive; the
state file in /run/vctx/NAME names both.  Boots and the wait for a stop go
to vctxd (control.py); signals go straight to the guest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from cowfs.daemon import find_mount

from . import config, control, errors, netctx
from . import guest as guests
from . import sys as k
from .cgroups import GuestCgroups
from .home import Home
from .monitor import cleanup, proc_start, run_dir, standby_pid, stat_fields, state_path


@dataclass
class Running:
    name: str
    monitor: int
    init: int
    started: float
    root: str
    style: str
    net: str  # the network mode it booted with
    home: str
    allow_syscalls: tuple[str, ...] = ()  # what its seccomp filter lets through after all


def _alive(pid: int, start: int | None) -> bool:
    """pid runs (not a zombie) and is the process that started at start
    (clock ticks since boot), not a later one given the same number."""
    t = proc_start(pid)
    return t is not None and (start is None or t == start)


def running(name: str) -> Running | None:
    """The guest's live state, or None when it is stopped."""
    try:
        s = json.loads(state_path(name).read_text())
    except (OSError, ValueError):
        return None
    r = Running(
        name,
        int(s["monitor"]),
        int(s["init"]),
        float(s["started"]),
        str(s["root"]),
        str(s["style"]),
        str(s.get("net", "host")),
        str(s.get("home", "")),
        tuple(str(n) for n in s.get("allow_syscalls", ())),
    )
    if not _alive(r.monitor, s.get("monitor_start")) or not _alive(r.init, s.get("init_start")):
        return None
    return r


def boot(home: Home, name: str, timeout: float = 60.0) -> Running:
    """vctxd boots it (and says why not: a missing guest, one running, no
    init, limits the host cannot apply)."""
    g = guests.load(home, name)
    control.request({"op": "boot", "home": str(home.root), "name": name}, timeout)
    st = running(name)
    if st is None:
        raise errors.VctxError(f"guest {name} stopped right after boot (see {g.path / 'console.log'})")
    return st


def halt_signal(style: str) -> int | None:
    """How each init style is asked to power off (None: run a command)."""
    return {"systemd": k.rtmin(3), "busybox": int(signal.SIGUSR2), "plain": int(signal.SIGTERM)}.get(style)


def ask_halt(home: Home, name: str, style: str, init: int, timeout: float = 30.0) -> None:
    """Ask init to power off the way its style understands: a signal, or
    for sysvinit `telinit 0` from inside (blocks until telinit returns)."""
    sig = halt_signal(style)
    if sig is not None:
        try:
            os.kill(init, sig)
        except ProcessLookupError:
            pass
        return
    from .fast import run_via_forker

    argv = ["/sbin/telinit", "0"]
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        if run_via_forker(str(home.root), name, argv, "root", {}, None, [null] * 3, relay_signals=False) is not None:
            return
    except SystemExit:
        return  # it said why on stderr (the guest is gone already): nothing more to ask
    finally:
        os.close(null)
    # No forker: join from a child (joining the guest is for good).
    cmd = [sys.executable, "-m", "vctx", "exec", name, "--", *argv]
    try:
        subprocess.run(cmd, capture_output=True, timeout=timeout, env={**os.environ, "VCTX_HOME": str(home.root)})
    except subprocess.TimeoutExpired:
        pass


def _wait_gone(name: str, timeout: float) -> bool:
    reply = control.request({"op": "wait", "name": name, "timeout": timeout}, timeout + 10, start=False)
    return reply is None or bool(reply["gone"])


def stop(home: Home, name: str, timeout: float = 30.0) -> None:
    guests.load(home, name)
    r = running(name)
    if r is None:
        if GuestCgroups(name).exists() or find_mount(str(run_dir(name) / "root")):
            cleanup(name)
            return
        raise errors.NotRunning(f"guest {name!r} is not running")
    ask_halt(home, name, r.style, r.init, timeout)
    if not _wait_gone(name, timeout):
        # Shutdown took too long: the kill sequence on the whole context.
        GuestCgroups(name).kill()
        _wait_gone(name, 10.0)
    cleanup(name)


def apply_live(home: Home, name: str, r: Running, assignments: list[str]) -> list[str]:
    """`vctx set` on a running guest: limits and an isolated guest's addresses
    change now (the config is saved only if they did); returns what waits
    for the next boot."""
    keys = {a.partition("=")[0] for a in assignments}
    later = sorted(keys & {"hostname", "init", "command", "allow_syscalls", "page_cache"}) + sorted(
        k for k in keys if k.startswith("rlimit.")
    )

    def live(old: config.GuestConfig, new: config.GuestConfig) -> None:
        cg = GuestCgroups(name)
        cg.check(new.limits)
        if keys & {"ip", "interface"}:
            if r.net == "isolated" and new.net.mode == "isolated":
                netctx.update_isolated(netctx.plan(new))
            else:
                later.append("addresses")
        if "network" in keys and new.net.mode != r.net:
            later.append("network mode")
        if keys & {"bridge", "gateway"}:
            later.append("bridge")
        cg.apply(new.limits)

    guests.set_keys(home, name, assignments, before_save=live)
    return later


def kill(home: Home, name: str, sig: int) -> int:
    guests.load(home, name)
    if running(name) is None:
        raise errors.NotRunning(f"guest {name!r} is not running")
    return GuestCgroups(name).signal_all(sig)


def uptime(r: Running) -> float:
    return time.time() - r.started


def procs(name: str, helpers: bool = False) -> list[int]:
    """The guest's processes; with helpers, the forker's standby too (it sits
    in the guest's cgroup to serve the next `vctx exec` at once)."""
    pids = GuestCgroups(name).pids()
    if helpers:
        return pids
    sb = standby_pid(name)
    return [p for p in pids if p != sb]


def read_stat(pid: int) -> tuple[int, int]:
    """(vsz, rss) in bytes of one process."""
    fields = stat_fields(pid)
    if fields is None:
        return 0, 0
    return int(fields[20]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def wait_systemd(home: Home, name: str, timeout: float) -> str:
    """systemd's own verdict once boot is over: running, degraded, ..."""
    from .fast import wait_systemd as wait

    r = running(name)
    return "stopped" if r is None else wait(str(home.root), name, r.init, timeout)
