"""Guests on disk: create (clone a template) and delete."""

from __future__ import annotations

import copy
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cowfs.clone import clone
from cowfs.daemon import find_mount, serving

from . import config, errors, idrange
from . import template as templates
from .files import replace_in_tree
from .home import Home, check_name

CONFIG = "guest.toml"


@dataclass
class Guest:
    name: str
    path: Path
    cfg: config.GuestConfig

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG


def load(home: Home, name: str) -> Guest:
    path = home.guest(name)
    if not path.is_dir():
        raise errors.NotFound(f"no guest {name!r} (see vctx list)")
    return Guest(name, path, config.load(path / CONFIG))


def names(home: Home) -> list[str]:
    return [n for n in home.names(home.guests) if (home.guests / n / CONFIG).exists()]


def configs(home: Home) -> list[config.GuestConfig]:
    """Every guest's config that loads (for checks across guests)."""
    out = []
    for n in names(home):
        try:
            out.append(config.load(home.guests / n / CONFIG))
        except errors.VctxError:
            continue
    return out


def create(
    home: Home,
    name: str,
    template_name: str,
    init: str | None = None,
    hostname: str | None = None,
    net: config.Net | None = None,
    root: str = "cowfs",
    autostart: bool = False,
) -> Guest:
    """A new guest's tree from the template (links to it, or a private copy
    for root = "plain") and its config."""
    check_name(name)
    t = templates.load(home, template_name)
    with home.locked():
        path = home.guest(name)
        if path.exists():
            raise errors.Exists(f"guest {name!r} exists")
        cfg = config.GuestConfig(
            name=name,
            template=template_name,
            init=init or t.init,
            id_base=idrange.allocate(home),
            hostname=hostname or name,
            net=net or config.Net(),
            root=root,
            autostart=autostart,
        )
        cfg.check()
        _check_addresses(home, cfg)
        partial = home.guests / f".{name}.partial-{secrets.token_hex(4)}"
        partial.mkdir(mode=0o700)
        try:
            clone(str(t.rootfs), str(partial / "rootfs"), copy=root == "plain")
            # Per-guest identity: fresh files, never writes into the template's inodes.
            tree = partial / "rootfs"
            if (tree / "etc").is_dir():
                replace_in_tree(tree, "etc/hostname", f"{cfg.hostname}\n".encode())
                if (tree / "etc/machine-id").exists():
                    replace_in_tree(tree, "etc/machine-id", f"{secrets.token_hex(16)}\n".encode(), 0o444)
            config.save(cfg, partial / CONFIG)
            partial.rename(path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return Guest(name, path, cfg)


def mounted_at(g: Guest) -> str | None:
    """Where the guest's tree is mounted while it runs: by cowfs, or (a
    plain root) bind-mounted at its run directory."""
    live = serving(str(g.rootfs))
    if live is not None:
        return live[0]
    from .monitor import run_dir  # monitor imports this module

    mp = run_dir(g.name) / "root"
    try:
        # (by mountinfo: a bind mount of the same filesystem fools os.path.ismount)
        if find_mount(str(mp)) is not None and os.path.samestat(os.stat(mp), os.stat(g.rootfs)):
            return str(mp)
    except OSError:
        pass
    return None


def delete(home: Home, name: str) -> None:
    g = load(home, name)
    with home.locked():
        live = mounted_at(g)
        if live is not None:
            raise errors.Running(f"guest {name!r} is running (its root is mounted at {live}): vctx stop {name} first")
        gone = home.guests / f".{name}.deleting-{secrets.token_hex(4)}"
        g.path.rename(gone)
    # rmtree works from directory fds and never follows the guest's symlinks
    shutil.rmtree(gone)


# `vctx set` keys: where each lives in the config, and how its text is read.
_LIMIT_KEYS = {
    "memory": str,
    "swap": str,
    "cpus": float,
    "cpu_weight": int,
    "cpuset": str,
    "pids": int,
    "io_weight": int,
}
_NET_KEYS = {"network": "mode", "ip": "ip", "interface": "interface", "bridge": "bridge", "gateway": "gateway"}


def _check_addresses(home: Home, cfg: config.GuestConfig, old: config.GuestConfig | None = None) -> None:
    """Addresses no other guest has, on an interface that exists, and not
    already the host's (the guest's own current ones aside)."""
    from . import netctx

    p = netctx.plan(cfg)
    netctx.check_unique(p, configs(home))
    if cfg.net.mode == "host":
        return
    before = {a.ip for a in old.net.addresses()} if old is not None else set()
    netctx.check_host(p, before)


def set_keys(
    home: Home,
    name: str,
    assignments: list[str],
    before_save: Callable[[config.GuestConfig, config.GuestConfig], None] | None = None,
) -> config.GuestConfig:
    """Apply KEY=VALUE changes to a guest's config; all are checked before any
    is saved, and before_save(old, new) (a running guest's live change) must
    succeed too.  An empty value (memory=) removes a limit."""
    with home.locked():
        g = load(home, name)
        old = copy.deepcopy(g.cfg)
        cfg = g.cfg
        for a in assignments:
            key, eq, value = a.partition("=")
            if not eq:
                raise errors.UsageError(f"expected KEY=VALUE, not {a!r}")
            if key in _LIMIT_KEYS:
                try:
                    setattr(cfg.limits, key, _LIMIT_KEYS[key](value) if value else None)
                except ValueError:
                    raise errors.BadConfig(f"{key}: {value!r} is not a {_LIMIT_KEYS[key].__name__}") from None
            elif key in _NET_KEYS:
                v: object = [x for x in value.split(",") if x] if key == "ip" else value
                setattr(cfg.net, _NET_KEYS[key], v)
            elif key.startswith("rlimit."):
                rname = key.removeprefix("rlimit.")
                if value:
                    config.parse_rlimit(rname, value)
                    cfg.rlimits[rname] = value
                else:
                    cfg.rlimits.pop(rname, None)
            elif key == "allow_syscalls":
                cfg.allow_syscalls = [x for x in value.split(",") if x]
            elif key == "hostname":
                cfg.hostname = value
            elif key == "autostart":
                cfg.autostart = config.parse_bool(value, key)
            elif key == "page_cache":
                cfg.page_cache = value
            elif key == "init":
                cfg.init = value
            elif key == "command":
                import shlex

                cfg.command = shlex.split(value)
            else:
                raise errors.BadConfig(f"unknown key {key!r}")
        cfg.check()
        _check_addresses(home, cfg, old)
        if before_save is not None:
            before_save(old, cfg)
        config.save(cfg, g.config_path)
        return cfg
