"""The `vctx` command line.

Guests (create, boot, enter, exec, stop) are built on cowfs; until those
verbs land, `vctx` reports what this host offers them.
"""

from __future__ import annotations

import json
import os

import click

from . import __version__
from .host import probe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vctx")
def main() -> None:
    """Linux-VServer style guests on a stock kernel."""


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


if __name__ == "__main__":
    main(prog_name=os.path.basename(__file__))
