"""The `vctx` entry point, with fast paths for `vctx exec` and `vctx boot`.

exec is the command scripts run in loops; importing the full command line
(click, templates, cowfs' clone) would cost it more than the exec itself.
The common shape `vctx exec NAME [-u U] [-e K=V]... [-w D] -- CMD...` is
parsed here and handed, with this process's stdin, stdout and stderr, to
the forker of vctxd (zygote.py), which has everything imported already;
this side imports nothing but builtin modules.  Signals that would end or
steer the command are relayed to it; its exit code is ours.  `vctx boot
NAME [--wait]` only asks vctxd, which checks and boots the guest.  Anything
else (a tty, no daemon, a name that needs explaining) goes to the full
command line.

Python's own start is most of an exec's cost, so this module imports `posix`,
not `os` (which brings _collections_abc: 1.2 ms), and not `__future__`; and
the launcher tools/setup installs starts Python without `site` (-S: 1.6 ms
of .pth files).  Whatever needs site-packages calls cowfs.fast.full() first.
"""

import _socket
import posix
import sys


def _env(key: str, default: str = "") -> str:
    value = posix.environ.get(key.encode())
    return value.decode(errors="surrogateescape") if value is not None else default


RUN = _env("VCTX_RUN", "/run/vctx")
DEVNULL = "/dev/null"


def _stat_mode(path: str) -> int:
    """st_mode, or 0 where path is missing or cannot be reached."""
    try:
        return posix.stat(path).st_mode
    except OSError:
        return 0


def _connect(name: str, kind: int) -> _socket.socket | None:
    """A unix socket of kind connected to RUN/name, or None where nothing
    listens there."""
    s = _socket.socket(_socket.AF_UNIX, kind | _socket.SOCK_CLOEXEC)
    try:
        s.connect(f"{RUN}/{name}")
    except OSError:
        s.close()
        return None
    return s


# the signals relayed to the command (zygote.FORWARDED): INT TERM HUP QUIT USR1 USR2 WINCH CONT
RELAYED = (2, 15, 1, 3, 10, 12, 28, 18)


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


def run_via_forker(
    home: str,
    name: str,
    argv: list[str],
    user: str,
    env: dict[str, str],
    workdir: str | None,
    stdio: list[int],
    relay_signals: bool = True,
) -> int | None:
    """Run argv in the guest through vctxd's forker; None if there is no
    forker to ask.  Errors come back as (exit code, message): raised as
    SystemExit after the message is written to stderr."""
    import _signal  # type: ignore[import-not-found]  # signal.py would import enum: 4 ms
    import marshal

    s = _connect("exec.sock", _socket.SOCK_SEQPACKET)
    if s is None:
        return None
    req = {"home": home, "name": name, "argv": argv, "user": user, "env": env, "workdir": workdir}
    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in stdio)
    s.sendmsg([marshal.dumps(req)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])

    def relay(sig: int, _frame: object) -> None:
        try:
            s.send(b"s%d" % sig)
        except OSError:
            pass

    if relay_signals:  # (the main thread only)
        for sig in RELAYED:
            _signal.signal(sig, relay)
    while True:
        msg = s.recv(4096)
        if not msg:
            sys.stderr.write(f"vctx: the exec helper for {name} died\n")
            raise SystemExit(1)
        if msg[:1] == b"x":
            return int(msg[1:])
        if msg[:1] == b"E":
            code, _, text = msg[1:].decode(errors="replace").partition(" ")
            sys.stderr.write(f"vctx: {text}\n")
            raise SystemExit(int(code) if code.isdigit() else 1)


def wait_systemd(home: str, name: str, init: int, timeout: float) -> str:
    """systemd's own verdict once boot is over: running, degraded, ...

    `systemctl is-system-running --wait` talks to systemd over its private
    socket, which appears a moment after init starts: wait for it (a stat
    through /proc/INIT/root), then ask once, through vctxd's forker.
    """
    import time

    deadline = time.monotonic() + timeout
    while not _stat_mode(f"/proc/{init}/root/run/systemd/private"):
        if not _stat_mode(f"/proc/{init}"):
            return "stopped"
        if time.monotonic() > deadline:
            return "timed out"
        time.sleep(0.005)
    rd, wr = posix.pipe2(posix.O_CLOEXEC)
    null = posix.open(DEVNULL, posix.O_RDWR | posix.O_CLOEXEC)
    argv = ["systemctl", "is-system-running", "--wait"]
    try:
        code = run_via_forker(home, name, argv, "root", {}, None, [null, wr, null], relay_signals=False)
        posix.close(wr)
        wr = -1
        if code is None:
            return "unknown (vctxd's forker is not running)"
        out = b""
        while chunk := posix.read(rd, 4096):
            out += chunk
        return out.decode(errors="replace").strip() or "unknown"
    finally:
        for fd in (rd, wr, null):
            if fd >= 0:
                posix.close(fd)


def _parse_boot(args: list[str]) -> tuple[str, bool, float] | None:
    """`boot|start [--wait] [--timeout S] NAME`, options on either side of
    the name as click takes them, of a guest that exists."""
    if not args or args[0] not in ("boot", "start"):
        return None
    names: list[str] = []
    wait, timeout = False, 120.0
    rest = iter(args[1:])
    for a in rest:
        if a == "--wait":
            wait = True
        elif a == "--timeout" or a.startswith("--timeout="):
            value = next(rest, "") if a == "--timeout" else a.partition("=")[2]
            try:
                timeout = float(value)
            except ValueError:
                return None  # the full command line says what is wrong
        elif a == "--":
            names += rest
            break
        elif a.startswith("-"):
            return None
        else:
            names.append(a)
    if len(names) != 1:
        return None
    name = names[0]
    # home.NAME_RE, spelt out (re costs this path 5 ms); a name it would refuse goes to the full command line
    ok = name[:1].isalnum() and len(name) <= 63 and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in name)
    if not ok or _stat_mode(f"{_home()}/guests/{name}/guest.toml") & 0o170000 != 0o100000:  # a regular file
        return None  # the full command line says what is wrong
    return name, wait, timeout


def _home() -> str:
    """Absolute: the forker's working directory is not ours.  (Home makes
    the same path of it: Path.absolute() does not fold `..` either.)"""
    home = _env("VCTX_HOME") or "/var/lib/vctx"
    return home if home.startswith("/") else f"{posix.getcwd()}/{home}"


def _json_str(s: str) -> str:
    """s as a JSON string, as json.dumps writes it but for non-ASCII text,
    which goes as UTF-8 (json imports re and enum: 9 ms of a boot)."""
    out = []
    for c in s:
        o = ord(c)
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif o < 0x20 or 0xD800 <= o < 0xE000:  # (surrogates: a path's undecodable bytes)
            out.append(f"\\u{o:04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _ask_running(msg: str, timeout: float) -> dict[str, object] | None:
    """The reply of a vctxd that is there to ask, in marshal (control.py's
    JSON reply would cost the import of json); None if none answers, for
    control.request to start one and ask again."""
    import marshal

    s = _connect("vctxd.sock", _socket.SOCK_STREAM)
    if s is None:
        return None
    data = b""
    try:
        s.settimeout(timeout)
        s.sendall(msg.encode())
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        sys.stderr.write(f"vctx: vctxd did not answer within {timeout:.0f}s\n")
        sys.exit(1)
    except OSError:
        data = b""
    finally:
        s.close()
    if not data:  # it was on its way out (idle)
        return None
    try:
        reply: dict[str, object] = marshal.loads(data)
    except (ValueError, EOFError, TypeError):  # a vctxd older than this client: JSON
        import json

        reply = json.loads(data)
    return reply


def _boot(name: str, wait: bool, timeout: float) -> None:
    """The daemon checks and boots the guest: this side only asks."""
    home = _home()
    msg = f'{{"op": "boot", "home": {_json_str(home)}, "name": {_json_str(name)}, "reply": "marshal"}}\n'
    reply = _ask_running(msg, 60.0)
    if reply is None:  # no daemon yet: control.py starts one
        from . import control, errors

        try:
            reply = control.request({"op": "boot", "home": home, "name": name}, 60.0)
        except errors.VctxError as e:
            sys.stderr.write(f"vctx: {e}\n")
            sys.exit(e.exit_code)
        assert reply is not None
    elif "error" in reply:
        sys.stderr.write(f"vctx: {reply['error']}\n")
        code = reply.get("code", 1)
        sys.exit(code if isinstance(code, int) else 1)
    print(f"booted {name}: init pid {reply['init']}, monitor pid {reply['daemon']}", flush=True)
    if wait and reply["style"] == "systemd":
        state = wait_systemd(home, name, int(reply["init"]), timeout)  # type: ignore[call-overload]
        print(f"{name}: {state}", flush=True)
        if state not in ("running", "degraded"):
            sys.exit(1)
    sys.exit(0)


def _stdio() -> list[int]:
    """Our fds 0-2, a closed one replaced by /dev/null (it cannot be passed)."""
    out = []
    for fd in (0, 1, 2):
        try:
            posix.fstat(fd)
            out.append(fd)
        except OSError:
            out.append(posix.open(DEVNULL, posix.O_RDWR))
    return out


def entry() -> None:
    booting = _parse_boot(sys.argv[1:])
    if booting is not None:
        _boot(*booting)
    parsed = _parse(sys.argv[1:])
    if parsed is None:
        from cowfs.fast import full

        full()
        from .cli import main

        main()
        return
    name, cmd, opts = parsed
    if not opts["tty"]:
        home = _home()
        env: dict[str, str] = opts["env"]  # type: ignore[assignment]
        workdir: str | None = opts["workdir"]  # type: ignore[assignment]
        code = run_via_forker(home, name, cmd, str(opts["user"]), env, workdir, _stdio())
        if code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            posix._exit(code)  # nothing to finalise: skip the interpreter's teardown (2 ms)
    from cowfs.fast import full

    full()
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
