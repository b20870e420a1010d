"""The `vctx` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from cowfs import errors as cowfs_errors
from cowfs.cligroup import ErrorsToExitCodes
from cowfs.progress import human

from . import __version__, errors
from . import guest as guests
from . import template as templates
from .config import Net
from .home import Home
from .host import probe


class _Group(ErrorsToExitCodes):
    prog = "vctx"
    user_errors = (errors.VctxError, cowfs_errors.CowfsError)


def _home(ctx: click.Context) -> Home:
    home: Home = ctx.obj
    return home


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vctx")
@click.option("--home", envvar="VCTX_HOME", help="Where templates and guests live [default: /var/lib/vctx].")
@click.pass_context
def main(ctx: click.Context, home: str | None) -> None:
    """Linux-VServer style guests on a stock kernel."""
    ctx.obj = Home(home)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def host(as_json: bool) -> None:
    """What this host offers guests: kernel, FUSE, cgroup layout."""
    facts = probe()
    if as_json:
        click.echo(json.dumps(facts))
        return
    width = max(map(len, facts))
    for k, v in facts.items():
        click.echo(f"{k:<{width}}  {v}")


# --- templates ----------------------------------------------------------------------


@main.group(cls=_Group)
def template() -> None:
    """Build, list, show and delete templates."""


def _status() -> templates.Status:
    if not sys.stderr.isatty():
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True)
    st = console.status("")
    st.start()

    def update(msg: str) -> None:
        st.update(msg[:150])

    import atexit

    atexit.register(st.stop)
    return update


@template.command(name="build")
@click.argument("name")
@click.option("--from", "source", type=click.Choice(["busybox", "debian"]), help="What to build from.")
@click.option("--from-tar", type=click.Path(path_type=Path), help="Import a rootfs tarball.")
@click.option("--from-dir", type=click.Path(path_type=Path), help="Import a directory.")
@click.option("--suite", type=click.Choice(templates.SUITES), default="bookworm", show_default=True)
@click.option("--init", type=click.Choice(["systemd", "sysvinit"]), default="systemd", show_default=True)
@click.option("--include", default="", help="Extra packages, comma-separated.")
@click.option("--mirror", default=templates.MIRROR, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Keep downloaded .debs here (debootstrap).")
@click.pass_context
def template_build(
    ctx: click.Context,
    name: str,
    source: str | None,
    from_tar: Path | None,
    from_dir: Path | None,
    suite: str,
    init: str,
    include: str,
    mirror: str,
    cache_dir: Path | None,
) -> None:
    """Build template NAME (busybox, Debian by debootstrap, a tarball or a directory)."""
    home = _home(ctx)
    home.template(name)  # checks the name before any work
    chosen = [x for x in (source, from_tar, from_dir) if x is not None]
    if len(chosen) != 1:
        raise errors.UsageError("give exactly one of --from busybox|debian, --from-tar FILE, --from-dir DIR")
    status = _status()
    if source == "busybox":
        desc = "busybox"

        def builder(root: Path) -> None:
            templates.build_busybox(root, status)
    elif source == "debian":
        desc = f"debian {suite} ({init})"
        pkgs = [p for p in include.split(",") if p]

        def builder(root: Path) -> None:
            templates.build_debian(root, status, suite, init, pkgs, mirror, cache_dir.absolute() if cache_dir else None)
    elif from_tar is not None:
        if not from_tar.is_file():
            raise errors.NotFound(f"{from_tar} is not a file")
        desc = f"tar {from_tar.absolute()}"

        def builder(root: Path) -> None:
            templates.import_tar(root, status, from_tar.absolute())
    else:
        assert from_dir is not None
        if not from_dir.is_dir():
            raise errors.NotFound(f"{from_dir} is not a directory")
        desc = f"dir {from_dir.absolute()}"

        def builder(root: Path) -> None:
            templates.import_dir(root, status, from_dir.absolute())

    t = templates.build(home, name, desc, builder, status)
    click.echo(f"built template {t.name}: {t.files:,} files, {human(t.size)}, init {t.init}")


@template.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def template_list(ctx: click.Context, as_json: bool) -> None:
    """List templates."""
    home = _home(ctx)
    ts = templates.list_all(home)
    if as_json:
        click.echo(json.dumps([t.as_json() | {"guests": templates.users(home, t.name)} for t in ts]))
        return
    rows: list[tuple[str, ...]] = [("NAME", "INIT", "FILES", "SIZE", "GUESTS", "SOURCE")]
    for t in ts:
        rows.append((t.name, t.init, f"{t.files:,}", human(t.size), str(len(templates.users(home, t.name))), t.source))
    _table(rows)


@template.command(name="show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def template_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one template."""
    home = _home(ctx)
    t = templates.load(home, name)
    info = t.as_json() | {"guests": templates.users(home, name)}
    if as_json:
        click.echo(json.dumps(info))
        return
    for k, v in info.items():
        click.echo(f"{k:<8} {', '.join(v) if isinstance(v, list) else v}")


@template.command(name="delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even if guests were cloned from it.")
@click.pass_context
def template_delete(ctx: click.Context, name: str, force: bool) -> None:
    """Delete a template (refused while guests use it, unless --force)."""
    templates.delete(_home(ctx), name, force)
    click.echo(f"deleted template {name}")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# --- guests -------------------------------------------------------------------------


@main.command()
@click.argument("name")
@click.option("--template", "-t", "template_name", required=True, help="Template to clone.")
@click.option("--init", type=click.Choice(["systemd", "sysvinit", "busybox"]), help="Init style [default: detected].")
@click.option("--hostname", help="[default: the guest's name]")
@click.option("--ip", "ips", multiple=True, help="An address of the guest (repeat for several; IPv4 and IPv6).")
@click.option(
    "--interface",
    default="",
    help="Host interface for its addresses [default: lo for 127/8, else the default route's].",
)
@click.option(
    "--network", type=click.Choice(["isolated", "netns", "none", "host"]), default="isolated", show_default=True
)
@click.option("--autostart", is_flag=True, help="Boot it with the host (vctx unit).")
@click.option(
    "--root",
    type=click.Choice(["cowfs", "plain"]),
    default="cowfs",
    show_default=True,
    help="cowfs: hard links to the template, copied on write; plain: a private copy, mounted idmapped (no FUSE).",
)
@click.pass_context
def create(
    ctx: click.Context,
    name: str,
    template_name: str,
    init: str | None,
    hostname: str | None,
    ips: tuple[str, ...],
    interface: str,
    network: str,
    root: str,
    autostart: bool,
) -> None:
    """Create guest NAME as a copy-on-write clone of a template."""
    net = Net(mode=network, ip=[a for x in ips for a in x.split(",") if a], interface=interface)
    g = guests.create(
        _home(ctx), name, template_name, init=init, hostname=hostname, net=net, root=root, autostart=autostart
    )
    base = g.cfg.id_base
    how = "" if root == "cowfs" else ", a plain copy"
    click.echo(f"created guest {g.name} from {template_name} (ids {base}-{base + g.cfg.id_size - 1}{how})")


@main.command()
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, name: str) -> None:
    """Delete a stopped guest: its tree and its config."""
    guests.delete(_home(ctx), name)
    click.echo(f"deleted guest {name}")


@main.command(name="set")
@click.argument("name")
@click.argument("assignments", nargs=-1, required=True)
@click.pass_context
def set_cmd(ctx: click.Context, name: str, assignments: tuple[str, ...]) -> None:
    """Change guest NAME's config: memory=512M cpus=1.5 pids=512 hostname=...
    ip=ADDR,ADDR interface=DEV network=MODE allow_syscalls=NAME,NAME
    autostart=yes|no page_cache=shared|private

    Limits, and an isolated guest's addresses, take effect at once on a
    running guest; the rest at its next boot.
    """
    from . import runtime

    home = _home(ctx)
    r = runtime.running(name)
    if r is None:
        guests.set_keys(home, name, list(assignments))
        click.echo(f"updated {name}")
        return
    later = runtime.apply_live(home, name, r, list(assignments))
    note = f" ({', '.join(later)} at the next boot)" if later else ""
    click.echo(f"updated {name}: applied to the running guest{note}")


# --- running guests --------------------------------------------------------------------


@main.command(name="boot")
@click.argument("name", required=False)
@click.option("--wait", is_flag=True, help="Return once systemd reports the system running (or degraded).")
@click.option("--timeout", type=float, default=120.0, show_default=True)
@click.option("--autostart", is_flag=True, help="Instead of NAME: every guest with autostart = true (host boot).")
@click.pass_context
def boot_cmd(ctx: click.Context, name: str | None, wait: bool, timeout: float, autostart: bool) -> None:
    """Boot guest NAME: mount its tree, start its init in a new context."""
    from . import runtime

    if autostart:
        if name is not None or wait:
            raise errors.UsageError("--autostart boots the marked guests: give no NAME (and no --wait)")
        from .autostart import boot_marked

        failed = 0
        for guest_name, what, ok in boot_marked(_home(ctx)):
            click.echo(f"{guest_name}: {what}", err=not ok)
            failed += not ok
        if failed:
            raise errors.VctxError(f"{failed} guest(s) marked autostart did not boot")
        return
    if name is None:
        raise errors.UsageError("which guest? (vctx boot NAME, or --autostart)")
    r = runtime.boot(_home(ctx), name)
    click.echo(f"booted {name}: init pid {r.init}, monitor pid {r.monitor}")
    if wait and r.style == "systemd":
        state = runtime.wait_systemd(_home(ctx), name, timeout)
        click.echo(f"{name}: {state}")
        if state not in ("running", "degraded"):
            sys.exit(1)


main.add_command(boot_cmd, name="start")


@main.command()
@click.argument("name", required=False)
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds for a clean shutdown.")
@click.option("--all", "every", is_flag=True, help="Instead of NAME: every running guest, in parallel (host shutdown).")
@click.pass_context
def stop(ctx: click.Context, name: str | None, timeout: float, every: bool) -> None:
    """Shut guest NAME down; kill what remains; verify nothing is left."""
    from . import runtime

    if every:
        if name is not None:
            raise errors.UsageError("--all stops every running guest: give no NAME")
        from .autostart import stop_all

        def report(guest_name: str, what: str, ok: bool) -> None:
            click.echo(f"{guest_name}: {what}", err=not ok)

        if not stop_all(_home(ctx), timeout, report):
            raise errors.VctxError("some guests did not stop")
        return
    if name is None:
        raise errors.UsageError("which guest? (vctx stop NAME, or --all)")
    runtime.stop(_home(ctx), name, timeout)
    click.echo(f"stopped {name}")


@main.command()
@click.argument("name")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.pass_context
def restart(ctx: click.Context, name: str, timeout: float) -> None:
    """Stop (if running) and boot guest NAME."""
    from . import runtime

    if runtime.running(name) is not None:
        runtime.stop(_home(ctx), name, timeout)
    r = runtime.boot(_home(ctx), name)
    click.echo(f"booted {name}: init pid {r.init}, monitor pid {r.monitor}")


@main.command()
@click.argument("name")
@click.option("-s", "--signal", "sig", default="TERM", show_default=True, help="Signal name or number.")
@click.pass_context
def kill(ctx: click.Context, name: str, sig: str) -> None:
    """Send a signal to every process of guest NAME."""
    import signal as signal_mod

    from . import runtime

    try:
        num = int(sig) if sig.isdigit() else int(signal_mod.Signals["SIG" + sig.upper().removeprefix("SIG")])
    except KeyError:
        raise errors.UsageError(f"unknown signal {sig!r}") from None
    n = runtime.kill(_home(ctx), name, num)
    click.echo(f"signalled {n} process{'es' if n != 1 else ''}")


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-t", "--tty", is_flag=True, help="Give the command a pty (proxied).")
@click.option("--user", "-u", default="root", show_default=True)
@click.option("--env", "-e", "envs", multiple=True, metavar="K=V")
@click.option("--workdir", "-w")
@click.pass_context
def exec_cmd(
    ctx: click.Context,
    name: str,
    argv: tuple[str, ...],
    tty: bool,
    user: str,
    envs: tuple[str, ...],
    workdir: str | None,
) -> None:
    """Run a command in guest NAME and return its exit code: vctx exec NAME -- CMD..."""
    from .enter import exec_in

    env = {}
    for kv in envs:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise errors.UsageError(f"--env wants K=V, not {kv!r}")
        env[key] = value
    sys.exit(exec_in(_home(ctx), name, list(argv), user=user, env=env, workdir=workdir, tty=tty))


@main.command()
@click.argument("name")
@click.option("--user", "-u", default="root", show_default=True)
@click.pass_context
def enter(ctx: click.Context, name: str, user: str) -> None:
    """A login shell in guest NAME, through a pty proxy."""
    from .enter import exec_in

    sys.exit(exec_in(_home(ctx), name, [], user=user, tty=True, login=True))


def _guest_rows(home: Home, names: list[str]) -> list[dict[str, Any]]:
    from . import netctx, runtime
    from .cgroups import GuestCgroups

    rows = []
    for n in names:
        g = guests.load(home, n)
        r = runtime.running(n)
        row: dict[str, Any] = {
            "name": n,
            "ctx": g.cfg.id_base // 65536,
            "status": "running" if r else "stopped",
            "init": g.cfg.init,
            "template": g.cfg.template,
            "autostart": g.cfg.autostart,
            "network": g.cfg.net.mode,
            "ip": g.cfg.net.ip,
            "net": netctx.plan(g.cfg).describe(),
            "proc": 0,
            "vsz": 0,
            "rss": 0,
            "user_seconds": 0.0,
            "sys_seconds": 0.0,
            "uptime": 0.0,
        }
        if r:
            pids = runtime.procs(n)
            mem = [runtime.read_stat(p) for p in pids]
            st = GuestCgroups(n).stats()
            row.update(
                proc=len(pids),
                vsz=sum(v for v, _ in mem),
                rss=sum(x for _, x in mem),
                user_seconds=st.get("user_usec", 0) / 1e6,
                sys_seconds=st.get("system_usec", 0) / 1e6,
                uptime=runtime.uptime(r),
                init_pid=r.init,
                monitor_pid=r.monitor,
                stats=st,
            )
        rows.append(row)
    return rows


def _dur(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02}h" if d else f"{h:02}:{m:02}:{s:02}"


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Guests, with VServer's vserver-stat columns."""
    home = _home(ctx)
    rows = _guest_rows(home, guests.names(home))
    if as_json:
        click.echo(json.dumps(rows))
        return
    table: list[tuple[str, ...]] = [
        ("CTX", "PROC", "VSZ", "RSS", "userTIME", "sysTIME", "UPTIME", "NAME", "STATUS", "NET")
    ]
    for r in rows:
        up = r["status"] == "running"
        net = r["network"] + (" (!host)" if r["network"] == "host" else "")
        table.append(
            (
                str(r["ctx"]),
                str(r["proc"]) if up else "-",
                human(r["vsz"]) if up else "-",
                human(r["rss"]) if up else "-",
                _dur(r["user_seconds"]) if up else "-",
                _dur(r["sys_seconds"]) if up else "-",
                _dur(r["uptime"]) if up else "-",
                r["name"],
                r["status"],
                net + (" " + ",".join(r["ip"]) if r["ip"] else ""),
            )
        )
    _table(table)


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, name: str, as_json: bool) -> None:
    """Is guest NAME running? Exit 0 if so, 3 if stopped."""
    row = _guest_rows(_home(ctx), [name])[0]
    if as_json:
        click.echo(json.dumps(row))
    else:
        click.echo(
            f"{name}: {row['status']}"
            + (f", {row['proc']} processes, up {_dur(row['uptime'])}" if row["proc"] else "")
            + (", boots with the host" if row["autostart"] else "")
        )
        net = row["net"]
        extra = "".join(
            f", {k} {v if isinstance(v, str) else ' '.join(v)}" for k, v in net.items() if k not in ("mode", "ip")
        )
        click.echo(
            f"network: {net['mode']}{' (unconfined)' if net['mode'] == 'host' else ''}, ip {' '.join(net['ip']) or '-'}{extra}"
        )
    sys.exit(0 if row["status"] == "running" else 3)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """Host processes, with the guest each belongs to."""
    home = _home(ctx)
    owner: dict[int, str] = {}
    from . import runtime

    for n in guests.names(home):
        for pid in runtime.procs(n, helpers=True):  # where each process is: the standby too
            owner[pid] = n
    rows: list[dict[str, Any]] = []
    for d in sorted(Path("/proc").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            comm = (d / "comm").read_text().strip()
            uid = (d / "status").read_text().split("\nUid:")[1].split()[0]
        except (OSError, IndexError):
            continue
        rows.append({"pid": pid, "guest": owner.get(pid, "host"), "uid": int(uid), "command": cmd or f"[{comm}]"})
    if as_json:
        click.echo(json.dumps(rows))
        return
    table: list[tuple[str, ...]] = [("PID", "GUEST", "UID", "COMMAND")]
    table += [(str(r["pid"]), r["guest"], str(r["uid"]), r["command"][:100]) for r in rows]
    _table(table)


@main.command()
@click.option("--install", is_flag=True, help="Write it to /etc/systemd/system/vctx.service.")
@click.option(
    "--stop-timeout", type=float, default=60.0, show_default=True, help="Seconds each guest gets to shut down."
)
@click.pass_context
def unit(ctx: click.Context, install: bool, stop_timeout: float) -> None:
    """The systemd unit that boots autostart guests with the host and stops
    every guest before it goes down.  Printed, or installed with --install."""
    from .autostart import UNIT_PATH, install_unit
    from .autostart import unit as make_unit

    text = make_unit(_home(ctx), stop_timeout)
    if not install:
        click.echo(text, nl=False)
        return
    install_unit(text)
    click.echo(f"wrote {UNIT_PATH}; now: systemctl daemon-reload && systemctl enable vctx")


@main.group(cls=_Group)
def daemon() -> None:
    """vctxd, the host daemon that serves every running guest."""


@daemon.command(name="status")
@click.option("--json", "as_json", is_flag=True)
def daemon_status(as_json: bool) -> None:
    """Is vctxd running, and for which guests? Exit 0 if so, 3 if not."""
    from . import control

    d = control.request({"op": "ping"}, 10.0, start=False)
    if as_json:
        click.echo(json.dumps(d or {"running": False}))
    elif d is None:
        click.echo("vctxd: not running")
    else:
        guests = ", ".join(d["guests"]) or "none"
        click.echo(f"vctxd: pid {d['pid']}, forker pid {d['forker']}; guests: {guests}")
    sys.exit(0 if d is not None else 3)


@daemon.command(name="stop")
@click.option("--timeout", type=float, default=60.0, show_default=True)
def daemon_stop(timeout: float) -> None:
    """Stop every guest the way `vctx stop` does, then vctxd."""
    from cowfs.daemon import wait_pid_exit

    from . import control

    d = control.request({"op": "ping"}, 10.0, start=False)
    if d is None:
        raise errors.NotRunning("vctxd is not running")
    os.kill(int(d["pid"]), signal.SIGTERM)
    if not wait_pid_exit(int(d["pid"]), timeout):
        raise errors.VctxError(f"vctxd (pid {d['pid']}) did not exit within {timeout:.0f}s")
    click.echo(f"stopped vctxd and {len(d['guests'])} guests")


if __name__ == "__main__":
    main(prog_name=os.path.basename(__file__))
