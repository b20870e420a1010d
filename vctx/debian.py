"""A debootstrapped Debian tree, built once and cached.

The seed of `vctx template build --from debian`: used by the demo and the
benchmarks, which need a real distribution tree to work on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("VCTX_CACHE", "/var/cache/vctx"))
MIRROR = "http://deb.debian.org/debian"


def minbase(suite: str = "bookworm", cache: Path = CACHE, mirror: str = MIRROR) -> Path:
    """The cached minbase tree of suite, debootstrapped on first use.

    Built under a .partial name and renamed, so an interrupted build is
    never mistaken for a finished one.
    """
    tree = cache / f"{suite}-minbase"
    if (tree / "etc/debian_version").exists():
        return tree
    partial = cache / f"{suite}-minbase.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", suite, str(partial), mirror],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    partial.rename(tree)
    return tree
