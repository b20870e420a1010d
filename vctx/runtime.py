"""Running guests: boot, stop, kill, and what is known about them.

A guest runs when its monitor (monitor.py) is alive; the monitor's state
file in /run/vctx names it and the guest's init.  Every check goes through
pidfds, so a recycled pid is never mistaken for the guest.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cowfs.daemon import find_mount, wait_pid_exit

from . import config, errors, netctx
from . import guest as guests
from . import sys as k
from .cgroups import GuestCgroups
from .home import Home
from .monitor import run_dir, state_path


@dataclass
class Running:
    name: str
    monitor: int
    init: int
    started: float
    root: str
    style: str
    net: str  # the network mode it booted with


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    )
    if not _alive(r.monitor) or not _alive(r.init):
        return None
    return r


def _check_init(g: guests.Guest) -> None:
    cfg = g.cfg
    if cfg.init == "plain":
        prog = cfg.command[0]
        if not prog.startswith("/"):
            raise errors.BadConfig(f'command[0] must be an absolute path in the guest, not "{prog}"')
        path = prog.lstrip("/")
    else:
        path = "sbin/init"
    p = g.rootfs / path
    if not (p.is_symlink() or p.exists()):
        raise errors.BadConfig(f"guest {g.name} has no /{path} for init style {cfg.init}")


def boot(home: Home, name: str, timeout: float = 60.0) -> Running:
    g = guests.load(home, name)
    if running(name) is not None:
        raise errors.Running(f"guest {name!r} is already running")
    _check_init(g)
    # a crashed monitor's leftovers must not stop a new boot
    cleanup(name, quiet=True)
    r, w = os.pipe()
    log = open(g.path / "monitor.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "vctx.monitor", name, "--home", str(home.root), "--ready-fd", str(w)],
        pass_fds=(w,),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # not in the caller's session: it outlives the vctx command
    )
    log.close()
    os.close(w)
    msg = _read_all(r, timeout)
    if msg != "ok":
        proc.wait()
        if msg.startswith("E") and " " in msg:
            code, _, text = msg[1:].partition(" ")
            err = errors.VctxError(text)
            err.exit_code = int(code) if code.isdigit() else 1
            raise err
        raise errors.VctxError(f"cannot boot {name}: the monitor died (see {g.path / 'monitor.log'})")
    st = running(name)
    if st is None:
        raise errors.VctxError(f"guest {name} stopped right after boot (see {g.path / 'console.log'})")
    return st


def _read_all(fd: int, timeout: float) -> str:
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "E1 boot timed out"
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def halt_signal(style: str) -> int | None:
    """How each init style is asked to power off (None: run a command)."""
    return {"systemd": k.rtmin(3), "busybox": int(signal.SIGUSR2), "plain": int(signal.SIGTERM)}.get(style)


def stop(home: Home, name: str, timeout: float = 30.0) -> None:
    guests.load(home, name)
    r = running(name)
    if r is None:
        if GuestCgroups(name).exists() or find_mount(str(run_dir(name) / "root")):
            cleanup(name)
            return
        raise errors.NotRunning(f"guest {name!r} is not running")
    sig = halt_signal(r.style)
    try:
        if sig is not None:
            os.kill(r.init, sig)
        else:  # sysvinit: telinit, from inside (a child: joining the guest is for good)
            cmd = [sys.executable, "-m", "vctx", "exec", name, "--", "/sbin/telinit", "0"]
            subprocess.run(cmd, capture_output=True, timeout=timeout, env={**os.environ, "VCTX_HOME": str(home.root)})
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    if not wait_pid_exit(r.monitor, timeout):
        # Shutdown took too long: the kill sequence on the whole context.
        GuestCgroups(name).kill()
        if not wait_pid_exit(r.monitor, 10.0):
            os.kill(r.monitor, signal.SIGKILL)
            wait_pid_exit(r.monitor, 10.0)
    cleanup(name)


def cleanup(name: str, quiet: bool = False) -> None:
    """Make sure nothing of a stopped guest remains: processes, mount, cgroups."""
    cg = GuestCgroups(name)
    if cg.exists():
        cg.kill()
        deadline = time.monotonic() + 10
        while cg.populated() and time.monotonic() < deadline:
            time.sleep(0.01)
        if cg.populated() and not quiet:
            raise errors.VctxError(f"processes of {name} survive SIGKILL: {cg.pids()}")
    mnt = str(run_dir(name) / "root")
    while find_mount(mnt) is not None:
        k.umount(mnt, lazy=True)
    cg.remove()
    netctx.down(name)
    state_path(name).unlink(missing_ok=True)
    if cg.exists() and not quiet:
        raise errors.VctxError(f"cannot remove the cgroups of {name}")


def apply_live(home: Home, name: str, r: Running, assignments: list[str]) -> list[str]:
    """`vctx set` on a running guest: limits and an isolated guest's addresses
    change now (the config is saved only if they did); returns what waits
    for the next boot."""
    keys = {a.partition("=")[0] for a in assignments}
    later = sorted(keys & {"hostname", "init", "command"}) + sorted(k for k in keys if k.startswith("rlimit."))

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


def procs(name: str) -> list[int]:
    return GuestCgroups(name).pids()


def read_stat(pid: int) -> tuple[int, int]:
    """(vsz, rss) in bytes of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0, 0
    return int(fields[20]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def wait_systemd(name: str, timeout: float) -> str:
    """systemd's own verdict once boot is over: running, degraded, ...

    `systemctl is-system-running --wait` needs systemd's bus, which appears a
    moment after init starts: until then it fails at once, and is asked again.
    """
    deadline = time.monotonic() + timeout
    cmd = [sys.executable, "-m", "vctx", "exec", name, "--", "systemctl", "is-system-running", "--wait"]
    while True:
        left = deadline - time.monotonic()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            return "timed out"
        if res.stdout.strip():
            return res.stdout.strip()
        if running(name) is None:
            return "stopped"
        if time.monotonic() > deadline:
            return "timed out"
        time.sleep(0.05)  # the bus is not there yet
