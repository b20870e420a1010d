"""The host's boot and shutdown: guests marked autostart come up with the
host, and every guest goes down cleanly before it (VServer's
vservers-default init script and its `mark = default`).

`vctx boot --autostart` boots the marked guests one by one, each failure
reported and none stopping the others; `vctx stop --all` shuts every
running guest down at once, each with its own timeout.  `vctx unit` writes
the systemd unit that runs both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import errors, runtime
from . import guest as guests
from .files import write_atomic
from .home import Home

UNIT_PATH = Path("/etc/systemd/system/vctx.service")


def marked(home: Home) -> list[str]:
    """Guests to boot with the host, by name.  A guest whose config does
    not load is not skipped silently: its boot says what is wrong."""
    out = []
    for cfg_name in guests.names(home):
        try:
            if guests.load(home, cfg_name).cfg.autostart:
                out.append(cfg_name)
        except errors.VctxError:
            out.append(cfg_name)
    return out


def boot_marked(home: Home) -> Iterator[tuple[str, str, bool]]:
    """(name, what happened, ok) for each marked guest, as each boots."""
    for name in marked(home):
        if runtime.running(name) is not None:
            yield name, "already running", True
            continue
        try:
            r = runtime.boot(home, name)
        except errors.VctxError as e:
            yield name, str(e), False
            continue
        yield name, f"booted: init pid {r.init}", True


def stop_all(home: Home, timeout: float, report: Callable[[str, str, bool], None]) -> bool:
    """Stop every running guest of home in parallel; True if all stopped."""
    names = [n for n in guests.names(home) if runtime.running(n) is not None]

    def one(name: str) -> tuple[str, str, bool]:
        try:
            runtime.stop(home, name, timeout)
        except errors.NotRunning:
            return name, "stopped already", True
        except errors.VctxError as e:
            return name, str(e), False
        return name, "stopped", True

    ok = True
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(names)))) as pool:
        for name, what, good in pool.map(one, names):
            report(name, what, good)
            ok &= good
    return ok


def vctx_command() -> str:
    """This installation's `vctx`: the script next to the running Python
    (a venv's bin), else the script this process was started as."""
    here = Path(sys.executable).parent / "vctx"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    argv0 = Path(sys.argv[0])
    if argv0.name == "vctx" and argv0.is_file():
        return str(argv0.resolve())
    raise errors.HostLacks("cannot tell where the vctx command is installed")


def unit(home: Home, stop_timeout: float = 60.0) -> str:
    """The systemd unit: boot the marked guests once the network is up,
    stop every guest (cleanly, then by force) before the network goes."""
    vctx = vctx_command()
    for text in (vctx, str(home.root)):
        if any(c.isspace() or c in "\"'\\%$;" for c in text):
            raise errors.UsageError(f"{text!r}: a path with spaces or quotes cannot go in a unit file")
    return f"""\
# Written by `vctx unit --install`.  Guests with autostart = true boot with
# the host; every guest is shut down before it.
[Unit]
Description=vctx guests (autostart)
Wants=network-online.target
After=network-online.target remote-fs.target
RequiresMountsFor={home.root}

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=VCTX_HOME={home.root}
ExecStart={vctx} boot --autostart
ExecStop={vctx} stop --all --timeout {stop_timeout:g}
# A guest's clean shutdown, the kill that may follow it, and the cowfs unmount.
TimeoutStopSec={int(stop_timeout) + 60}

[Install]
WantedBy=multi-user.target
"""


def install_unit(text: str, path: Path = UNIT_PATH) -> None:
    if not path.parent.is_dir():
        raise errors.HostLacks(f"{path.parent} does not exist: is this host run by systemd?")
    write_atomic(path, text.encode(), 0o644)
