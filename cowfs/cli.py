"""The `cowfs` command line."""

from __future__ import annotations

import json
import os

import click

from . import __version__, errors
from .cligroup import ErrorsToExitCodes

# Each command imports what it uses when it runs: `cowfs clone` is timed
# against `cp -al`, and unify's or the daemon's imports are no part of it.


@click.group(cls=ErrorsToExitCodes, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cowfs")
def main() -> None:
    """Copy-on-write template filesystem: guests' trees as hard links to a template."""


@main.command()
@click.argument("backing")
@click.argument("mountpoint")
@click.option(
    "--uid-offset", type=click.IntRange(0, 2**32 - 1), default=None, help="Shift ids by N (guest's range start)."
)
@click.option(
    "--gid-offset",
    type=click.IntRange(0, 2**32 - 1),
    default=None,
    help="Shift group ids by N (default: --uid-offset).",
)
@click.option(
    "--id-range", type=click.IntRange(1, 2**32 - 1), default=65536, show_default=True, help="Size of the id range."
)
@click.option("--suid/--nosuid", default=False, show_default=True, help="Honour set-id bits.")
@click.option("--dev/--nodev", default=False, show_default=True, help="Allow device nodes to be opened.")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), help="Daemon log file.")
@click.option("--debug", is_flag=True, help="Log every request (slow).")
@click.option(
    "--shared-cache/--private-cache",
    default=True,
    show_default=True,
    help="Read shared files of 32 KiB or more through the shared inode's page cache (FUSE passthrough).",
)
@click.option(
    "--spin-us",
    type=click.IntRange(0, 10_000),
    default=30,
    show_default=True,
    help="Keep reading requests this long after one before sleeping (0: never; only a lone mount per process spins).",
)
@click.option(
    "--fd-budget",
    type=click.IntRange(32, 2**24),
    default=None,
    help="Most fds held for cached inodes [default: from RLIMIT_NOFILE].",
)
def mount(
    backing: str,
    mountpoint: str,
    uid_offset: int | None,
    gid_offset: int | None,
    id_range: int,
    suid: bool,
    dev: bool,
    foreground: bool,
    log_file: str | None,
    debug: bool,
    shared_cache: bool,
    spin_us: int,
    fd_budget: int | None,
) -> None:
    """Serve BACKING at MOUNTPOINT; returns when the mount is ready."""
    from .daemon import MountOptions
    from .daemon import mount as do_mount
    from .idmap import IdMap

    if uid_offset is None and gid_offset is None:
        idmap = IdMap()
    else:
        u = uid_offset if uid_offset is not None else gid_offset
        g = gid_offset if gid_offset is not None else uid_offset
        assert u is not None and g is not None
        idmap = IdMap(u, g, id_range)
    opts = MountOptions(
        idmap=idmap,
        suid=suid,
        dev=dev,
        log_file=log_file and os.path.abspath(log_file),
        debug=debug,
        fd_budget=fd_budget,
        shared_cache=shared_cache,
        spin_us=spin_us,
    )
    do_mount(backing, mountpoint, opts, foreground=foreground)


@main.command()
@click.argument("mountpoint")
@click.option("--lazy", "-l", is_flag=True, help="Detach now even if busy; the daemon exits when the last user goes.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the daemon.")
def umount(mountpoint: str, lazy: bool, timeout: float) -> None:
    """Unmount MOUNTPOINT and wait for its daemon to exit."""
    from .daemon import unmount as do_unmount

    do_unmount(mountpoint, lazy=lazy, timeout=timeout)


@main.command()
@click.argument("template")
@click.argument("dest")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--jobs", "-j", type=click.IntRange(0), default=0, help="Worker processes [default: one per CPU].")
@click.option("--copy", is_flag=True, help="Private copies instead of links: a tree to serve without cowfs.")
def clone(template: str, dest: str, as_json: bool, jobs: int, copy: bool) -> None:
    """Make DEST a guest tree of hard links to TEMPLATE's files, marked."""
    from .clone import clone as do_clone

    click.echo(do_clone(template, dest, jobs, copy).summary(as_json))


@main.group(name="attr")
def attr_group() -> None:
    """Show, set or clear the immutable-but-unlinkable mark."""


@attr_group.command(name="show")
@click.argument("paths", nargs=-1, required=True)
@click.option("-R", "recursive", is_flag=True, help="Recurse into directories.")
@click.option("--json", "as_json", is_flag=True)
def attr_show(paths: tuple[str, ...], recursive: bool, as_json: bool) -> None:
    """Show the mark of each PATH."""
    from . import attr

    rows = list(attr.show(paths, recursive))
    if as_json:
        click.echo(json.dumps([{"path": p, "iunlink": m} for p, m in rows]))
        return
    for p, m in rows:
        flag = "-" * 7 if m is None else ("iunlink" if m else "-------")
        click.echo(f"{flag} {p}")


def _change(paths: tuple[str, ...], recursive: bool, iunlink: bool, on: bool) -> None:
    if not iunlink:
        raise errors.UsageError("say which attribute: --iunlink")
    from . import attr

    n = attr.change(paths, recursive, on)
    click.echo(f"{'set' if on else 'cleared'} iunlink on {n} inode{'s' if n != 1 else ''}")


@attr_group.command(name="set")
@click.argument("paths", nargs=-1, required=True)
@click.option("-R", "recursive", is_flag=True, help="Recurse into directories.")
@click.option("--iunlink", is_flag=True, help="The immutable-but-unlinkable mark.")
def attr_set(paths: tuple[str, ...], recursive: bool, iunlink: bool) -> None:
    """Mark each PATH immutable-but-unlinkable."""
    _change(paths, recursive, iunlink, True)


@attr_group.command(name="clear")
@click.argument("paths", nargs=-1, required=True)
@click.option("-R", "recursive", is_flag=True, help="Recurse into directories.")
@click.option("--iunlink", is_flag=True, help="The immutable-but-unlinkable mark.")
def attr_clear(paths: tuple[str, ...], recursive: bool, iunlink: bool) -> None:
    """Clear the mark of each PATH."""
    _change(paths, recursive, iunlink, False)


def _print_stats(title: str, rows: list[tuple[str, str]]) -> None:
    click.echo(title)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")


@main.command()
@click.argument("trees", nargs=-1, required=True)
@click.option("--store", help="Content-addressed store [default: .cowfs-store beside the first tree].")
@click.option("--ignore-mtime", is_flag=True, help="Link files that differ only in mtime.")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN", help="Also skip these paths (repeatable).")
@click.option("--no-default-excludes", is_flag=True, help="Do not skip /etc, /var, /home, ..., keys and conffiles.")
@click.option("--min-size", type=click.IntRange(1), default=None, help="Smallest file to link [default: 16 bytes].")
@click.option("--jobs", "-j", type=click.IntRange(0), default=0, help="Worker processes [default: one per CPU].")
@click.option("--dry-run", "-n", is_flag=True, help="Report what would be linked; change nothing.")
@click.option("--revert", is_flag=True, help="Give the trees private copies of everything they share.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def unify(
    trees: tuple[str, ...],
    store: str | None,
    ignore_mtime: bool,
    excludes: tuple[str, ...],
    no_default_excludes: bool,
    min_size: int | None,
    jobs: int,
    dry_run: bool,
    revert: bool,
    as_json: bool,
) -> None:
    """Replace identical files of stopped guests' TREES by marked links to one inode."""
    from . import unify as unify_mod
    from .progress import human, terminal_progress

    if revert:
        rs = unify_mod.revert(list(trees), store, dry_run=dry_run)
        if as_json:
            click.echo(json.dumps(rs.__dict__))
            return
        _print_stats(
            f"{'would revert' if dry_run else 'reverted'} {len(trees)} tree{'s' * (len(trees) != 1)} in {rs.seconds:.2f}s",
            [
                ("files examined", f"{rs.files:,}"),
                ("private copies made", f"{rs.copied:,} ({human(rs.bytes_copied)})"),
                ("marks cleared", f"{rs.unmarked:,}"),
                ("store entries removed", f"{rs.gc_removed:,}"),
            ],
        )
        return
    opts = unify_mod.UnifyOptions(
        store=store,
        ignore_mtime=ignore_mtime,
        excludes=excludes,
        default_excludes=not no_default_excludes,
        min_size=unify_mod.MIN_SIZE if min_size is None else min_size,
        dry_run=dry_run,
        jobs=jobs,
    )
    with terminal_progress({"scan": "scanning", "hash": "hashing", "link": "linking"}) as progress:
        st = unify_mod.unify(list(trees), opts, progress)
    if as_json:
        click.echo(json.dumps(st.__dict__))
        return
    rate = st.hashed_bytes / st.hash_seconds if st.hash_seconds > 0 else 0.0
    _print_stats(
        f"{'dry run: would unify' if dry_run else 'unified'} {st.trees} tree{'s' * (st.trees != 1)} in {st.seconds:.2f}s",
        [
            ("files examined", f"{st.files:,} ({st.excluded:,} excluded paths)"),
            ("hashed", f"{st.candidates:,} files, {human(st.hashed_bytes)} at {human(rate)}/s"),
            ("names linked", f"{st.linked:,} ({st.groups:,} distinct files)"),
            ("bytes saved", f"{human(st.bytes_saved)} ({st.inodes_freed:,} inodes freed)"),
            ("changed meanwhile", f"{st.changed:,} left alone"),
            ("store", f"{st.store_added:,} added, {st.gc_removed:,} unused removed"),
        ],
    )


@main.group(name="store")
def store_group() -> None:
    """The unify store."""


@store_group.command(name="gc")
@click.argument("store")
def store_gc(store: str) -> None:
    """Remove stored inodes that no tree links to any more."""
    from . import unify as unify_mod

    n = unify_mod.gc(store)
    click.echo(f"removed {n} unused entr{'y' if n == 1 else 'ies'}")


@main.command()
@click.argument("trees", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def du(trees: tuple[str, ...], as_json: bool) -> None:
    """Disk use of TREES: private and shared bytes, and what sharing saves."""
    from . import du as du_mod
    from .progress import human

    rep = du_mod.du(list(trees))
    if as_json:
        click.echo(json.dumps(rep.as_json()))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("TREE", "APPARENT", "DISK ALONE", "PRIVATE", "SHARED", "INODES"):
        t.add_column(col, justify="left" if col == "TREE" else "right")
    for u in rep.trees:
        t.add_row(u.path, human(u.apparent), human(u.disk), human(u.private), human(u.shared), f"{u.inodes:,}")
    Console(width=200).print(t)
    pct = 100 * rep.saved / rep.full_copies if rep.full_copies else 0.0
    click.echo(
        f"on disk {human(rep.on_disk)}; as full copies {human(rep.full_copies)}; saved {human(rep.saved)} ({pct:.0f}%)"
    )
