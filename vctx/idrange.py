"""Id ranges: each guest gets 65536 host uids and gids of its own.

Guest root is then an unprivileged host uid.  Ranges are allocated from the
guests' configs (the record), never overlapping another guest's or what
/etc/subuid and /etc/subgid give to host users; a deleted guest's range is
free again.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from . import errors
from .home import Home

SIZE = 65536
FIRST = 16 * SIZE  # leave the low million to host users and their subuid ranges
LAST = 2**32 - 2  # (uid_t)-1 is "no id"


def _sub_ranges(path: Path) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((int(parts[1]), int(parts[2])))
    return out


def used(home: Home, etc: Path = Path("/etc")) -> list[tuple[int, int]]:
    out = _sub_ranges(etc / "subuid") + _sub_ranges(etc / "subgid")
    for g in home.names(home.guests):
        try:
            cfg = tomllib.loads((home.guests / g / "guest.toml").read_text())
            out.append((int(cfg["id_base"]), int(cfg.get("id_size", SIZE))))
        except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
            continue
    return out


def allocate(home: Home, etc: Path = Path("/etc")) -> int:
    """The lowest free aligned range start (call under home.locked())."""
    taken = sorted(used(home, etc))
    base = FIRST
    while base + SIZE - 1 <= LAST:
        clash = next((s + n for s, n in taken if s < base + SIZE and base < s + n), None)
        if clash is None:
            return base
        base = -(-clash // SIZE) * SIZE  # the next aligned start past the clash
    raise errors.NoIds("no free id range of 65536 left on this host")
