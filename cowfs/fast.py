"""The `cowfs` entry point, with a fast path for `cowfs clone`.

A clone is made for every `vctx create` and is measured against `cp -al`
(benchmarks/disk.py); importing click alone costs 20 ms, a sixth of cloning
a Debian tree.  `cowfs clone [--json] [-j N] TEMPLATE DEST` is parsed here;
anything else (help, a bad option, every other command) goes to the full
command line, which says the same things the same way.
"""

from __future__ import annotations

import sys


def _parse_clone(args: list[str]) -> tuple[str, str, bool, int] | None:
    if not args or args[0] != "clone":
        return None
    pos: list[str] = []
    as_json, jobs = False, 0
    rest = iter(args[1:])
    for a in rest:
        if a == "--json":
            as_json = True
        elif a in ("-j", "--jobs"):
            v = next(rest, "")
            if not v.isdigit():
                return None
            jobs = int(v)
        elif a.startswith("-"):
            return None
        else:
            pos.append(a)
    if len(pos) != 2:
        return None
    return pos[0], pos[1], as_json, jobs


def full() -> None:
    """Make site-packages importable, if the launcher tools/setup installs
    started us without site (-S, as vctx/fast.py explains).  vctx's command
    line calls it too."""
    if sys.flags.no_site:
        import site

        site.main()


def entry() -> None:
    parsed = _parse_clone(sys.argv[1:])
    if parsed is None:
        full()
        from .cli import main

        main()
        return
    from . import errors
    from .clone import clone

    template, dest, as_json, jobs = parsed
    try:
        print(clone(template, dest, jobs).summary(as_json))
    except errors.CowfsError as e:
        print(f"cowfs: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        print(f"cowfs: {errors.os_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("cowfs: interrupted", file=sys.stderr)
        sys.exit(130)
