"""Where vctx keeps templates, guests and the unify store.

    $VCTX_HOME (default /var/lib/vctx)
      templates/NAME/{template.toml,rootfs/}
      guests/NAME/{guest.toml,rootfs/}
      store/                 cowfs unify's content-addressed store
      lock                   serialises create/delete/build

Everything lives on one filesystem so guests can hard-link to templates and
the store.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import errors

DEFAULT = "/var/lib/vctx"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def check_name(name: str, what: str = "guest") -> str:
    if not NAME_RE.fullmatch(name):
        raise errors.BadName(f"bad {what} name {name!r}: use [a-z0-9][a-z0-9-]{{0,62}}")
    return name


class Home:
    def __init__(self, root: str | None = None) -> None:
        self.root = Path(root or os.environ.get("VCTX_HOME") or DEFAULT).absolute()

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def guests(self) -> Path:
        return self.root / "guests"

    @property
    def store(self) -> Path:
        return self.root / "store"

    def template(self, name: str) -> Path:
        return self.templates / check_name(name, "template")

    def guest(self, name: str) -> Path:
        return self.guests / check_name(name)

    def ensure(self) -> None:
        for d in (self.root, self.templates, self.guests):
            d.mkdir(mode=0o700, exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time for create, delete and template changes."""
        self.ensure()
        with flocked(self.root / "lock"):
            yield

    def names(self, kind: Path) -> list[str]:
        if not kind.is_dir():
            return []
        return sorted(p.name for p in kind.iterdir() if NAME_RE.fullmatch(p.name) and p.is_dir())


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on path (created if missing) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
