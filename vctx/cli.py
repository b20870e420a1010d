"""The `vctx` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from cowfs import errors as cowfs_errors
from cowfs.progress import human

from . import __version__, errors
from . import guest as guests
from . import template as templates
from .home import Home
from .host import probe


class _Group(click.Group):
    """Turns user errors into one line on stderr and a distinct exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (errors.VctxError, cowfs_errors.CowfsError) as e:
            click.echo(f"vctx: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"vctx: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("vctx: interrupted", err=True)
            sys.exit(130)


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
@click.pass_context
def create(ctx: click.Context, name: str, template_name: str, init: str | None, hostname: str | None) -> None:
    """Create guest NAME as a copy-on-write clone of a template."""
    g = guests.create(_home(ctx), name, template_name, init=init, hostname=hostname)
    base = g.cfg.id_base
    click.echo(f"created guest {g.name} from {template_name} (ids {base}-{base + g.cfg.id_size - 1})")


@main.command()
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, name: str) -> None:
    """Delete a stopped guest: its tree and its config."""
    guests.delete(_home(ctx), name)
    click.echo(f"deleted guest {name}")


if __name__ == "__main__":
    main(prog_name=os.path.basename(__file__))
