"""The `vctx` entry point, with a fast path for `vctx exec`.

exec is the command scripts run in loops; importing the full command line
(click, templates, cowfs' clone) would cost it more than the exec itself.
The common shape `vctx exec NAME [-t] [-u U] [-e K=V]... [-w D] -- CMD...`
is parsed here; anything else goes to the full command line.
"""

from __future__ import annotations

import sys


def _parse(args: list[str]) -> tuple[str, list[str], dict[str, object]] | None:
    if len(args) < 3 or args[0] != "exec" or args[1].startswith("-"):
        return None
    name, rest = args[1], args[2:]
    opts: dict[str, object] = {"tty": False, "user": "root", "env": {}, "workdir": None}
    env: dict[str, str] = {}
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            cmd = rest[i + 1 :]
            break
        if a in ("-t", "--tty"):
            opts["tty"] = True
        elif a in ("-u", "--user", "-e", "--env", "-w", "--workdir") and i + 1 < len(rest):
            v = rest[i + 1]
            i += 1
            if a in ("-u", "--user"):
                opts["user"] = v
            elif a in ("-w", "--workdir"):
                opts["workdir"] = v
            else:
                k, eq, val = v.partition("=")
                if not eq or not k:
                    return None
                env[k] = val
        elif a.startswith("-"):
            return None
        else:
            cmd = rest[i:]
            break
        i += 1
    else:
        return None
    if not cmd:
        return None
    opts["env"] = env
    return name, cmd, opts


def entry() -> None:
    parsed = _parse(sys.argv[1:])
    if parsed is None:
        from .cli import main

        main()
        return
    name, cmd, opts = parsed
    from . import errors
    from .enter import exec_in
    from .home import Home

    try:
        code = exec_in(
            Home(),
            name,
            cmd,
            user=str(opts["user"]),
            env=opts["env"],  # type: ignore[arg-type]
            workdir=opts["workdir"],  # type: ignore[arg-type]
            tty=bool(opts["tty"]),
        )
    except errors.VctxError as e:
        sys.stderr.write(f"vctx: {e}\n")
        sys.exit(e.exit_code)
    except OSError as e:
        sys.stderr.write(f"vctx: {e.strerror or e}\n")
        sys.exit(1)
    sys.exit(code)
