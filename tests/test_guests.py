"""Real guests: boot, exec, enter, limits, reboot, halt, stop — as root."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DEBS, fails, require, vctx
from hypothesis import given, strategies

from cowfs.daemon import wait_pid_exit
from vctx import seccomp
from vctx.cgroups import GuestCgroups

RUN = Path("/run/vctx")
CGROUP_V2 = Path("/sys/fs/cgroup/unified/vctx")


def _inotify_wait(directory: Path, cond: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Wait, without sleeping, until cond() holds: re-checked on every change in directory."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    directory.mkdir(parents=True, exist_ok=True)
    libc.inotify_add_watch(fd, str(directory).encode(), 0x2 | 0x8 | 0x80 | 0x100 | 0x200 | 0x40)
    try:
        while not cond():
            if not select.select([fd], [], [], timeout)[0]:
                return cond()
            os.read(fd, 65536)
        return True
    finally:
        os.close(fd)


def state(name: str) -> dict[str, object] | None:
    try:
        return json.loads((RUN / name / "state.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def bb_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(os.geteuid() == 0, "needs root")
    require(Path("/bin/busybox").is_file(), "needs busybox-static")
    require(os.path.exists("/proc/self/ns/user"), "needs user namespaces")
    home = tmp_path_factory.mktemp("guests") / "home"
    vctx(home, "template", "build", "bb", "--from", "busybox")
    return home


@pytest.fixture
def guest(bb_home: Path) -> Iterator[str]:
    name = f"t-{secrets.token_hex(3)}"
    vctx(bb_home, "create", name, "-t", "bb")
    yield name
    if state(name) is not None:
        vctx(bb_home, "stop", name, "--timeout", "10", check=False)
    subprocess.run(
        [sys.executable, "-c", f"from vctx import runtime; runtime.cleanup({name!r}, quiet=True)"], check=False
    )
    vctx(bb_home, "delete", name, check=False)


def nothing_left(name: str, pids: list[int]) -> None:
    assert not (CGROUP_V2 / name).exists() and not Path(f"/sys/fs/cgroup/memory/vctx/{name}").exists()
    assert str(RUN / name / "root") not in Path("/proc/self/mountinfo").read_text()
    assert state(name) is None
    assert not [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_boot_fast_path_takes_options_where_click_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vctx boot --wait NAME` and `vctx boot NAME --wait` both skip the
    full command line (importing it costs a boot 55 ms); anything the fast
    path cannot vouch for goes to click, which explains it."""
    from vctx.fast import _parse_boot

    monkeypatch.setenv("VCTX_HOME", str(tmp_path))
    (tmp_path / "guests" / "g1").mkdir(parents=True)
    (tmp_path / "guests" / "g1" / "guest.toml").write_text("version = 1\n")
    assert _parse_boot(["boot", "g1"]) == ("g1", False, 120.0)
    assert _parse_boot(["boot", "--wait", "g1"]) == ("g1", True, 120.0)
    assert _parse_boot(["start", "g1", "--wait", "--timeout", "5"]) == ("g1", True, 5.0)
    assert _parse_boot(["boot", "--timeout=2.5", "--", "g1"]) == ("g1", False, 2.5)
    for refused in (
        ["boot"],
        ["boot", "g2"],
        ["boot", "g1", "g1"],
        ["boot", "--timeout", "x", "g1"],
        ["boot", "-w", "g1"],
        ["boot", "G1"],
        ["boot", "g1", "--timeout"],
        ["exec", "g1"],
    ):
        assert _parse_boot(refused) is None, refused


@given(strategies.text())
def test_boot_fast_path_spells_json_strings(text: str) -> None:
    """The request is JSON spelt without json (whose import costs a boot
    9 ms): any name or home, undecodable bytes (surrogates) included."""
    from vctx.fast import _json_str

    assert json.loads(_json_str(text)) == text


def test_boot_exec_stop(bb_home: Path, guest: str) -> None:
    out = vctx(bb_home, "boot", guest).stdout
    assert "booted" in out
    st = state(guest)
    assert st is not None
    cfg = (bb_home / "guests" / guest / "guest.toml").read_text()
    base = int(next(line for line in cfg.splitlines() if line.startswith("id_base")).split("=")[1])

    def ex(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return vctx(bb_home, "exec", guest, "--", *cmd, **kw)  # type: ignore[arg-type]

    assert ex("cat", "/proc/1/comm").stdout.strip() == "init"  # PID 1 is the guest's init
    pids = [int(p) for p in ex("sh", "-c", "ls /proc | grep -E '^[0-9]+$'").stdout.split()]
    assert len(pids) < 10 and os.getpid() not in pids  # the host's processes are invisible
    assert ex("hostname").stdout.strip() == guest
    assert ex("cat", "/proc/self/uid_map").stdout.split() == ["0", str(base), "65536"]
    assert ex("id", "-u").stdout.strip() == "0"
    # guest root is an unprivileged host uid
    assert Path(f"/proc/{st['init']}/status").read_text().split("\nUid:")[1].split()[0] == str(base)
    assert ex("sh", "-c", "exit 7", check=False).returncode == 7
    res = subprocess.run(
        [sys.executable, "-m", "vctx", "exec", guest, "--", "sh", "-c", "tr a-z A-Z; echo err >&2"],
        input="hello\n",
        capture_output=True,
        text=True,
        env={**os.environ, "VCTX_HOME": str(bb_home)},
    )
    assert (res.stdout, res.stderr, res.returncode) == ("HELLO\n", "err\n", 0)
    assert vctx(bb_home, "exec", guest, "--user", "nobody", "--", "id", "-u").stdout.strip() == "65534"
    res = vctx(bb_home, "exec", guest, "--env", "X=42", "--workdir", "/etc", "--", "sh", "-c", "echo $X $(pwd)")
    assert res.stdout.strip() == "42 /etc"
    assert ex("no-such-program", check=False).returncode == 127
    # Most of these were started by the guest's standby itself (posix_spawn):
    # each carries what a forked child gets, and nothing of the standby's.
    for _ in range(2):
        assert ex("ls", "/proc/self/fd").stdout.split() == ["0", "1", "2", "3"]  # 3: ls's own listing
        status = dict(line.split(":\t", 1) for line in ex("cat", "/proc/self/status").stdout.splitlines())
        assert status["Seccomp"] == "2" and status["Seccomp_filters"] == "1" and status["Groups"].split() == ["0"]
        assert not int(status["CapBnd"], 16) & (1 << 16)  # no CAP_SYS_MODULE to regain
        # nothing blocked or ignored (but 32 and 33, which glibc's posix_spawn
        # leaves ignored: they are its own, and every libc installs its handlers)
        assert int(status["SigIgn"], 16) & ~(0b11 << 31) == 0 and int(status["SigBlk"], 16) == 0
    res = vctx(bb_home, "exec", guest, "--workdir", "/no-such-dir", "--", "true", check=False)
    assert res.returncode == 126 and "cannot change to /no-such-dir" in res.stderr
    res = ex("/etc/passwd", check=False)
    assert res.returncode == 126 and "Permission denied" in res.stderr
    # the guest cannot see or reach the host's tree
    assert not ex("ls", "/run/vctx", check=False).stdout

    assert vctx(bb_home, "status", guest).returncode == 0
    row = json.loads(vctx(bb_home, "list", "--json").stdout)
    mine = next(r for r in row if r["name"] == guest)
    assert mine["status"] == "running" and mine["proc"] >= 1 and mine["rss"] > 0
    assert "CTX" in vctx(bb_home, "list").stdout
    ps = json.loads(vctx(bb_home, "ps", "--json").stdout)
    assert {"pid": st["init"], "guest": guest} == {
        k: v for k, v in next(p for p in ps if p["pid"] == st["init"]).items() if k in ("pid", "guest")
    }
    # the execs above left the forker's standby in the guest's cgroup: ps shows
    # it there, list does not count it as the guest's own
    standby = int((RUN / guest / "standby").read_text())
    in_cgroup = [int(p) for p in (CGROUP_V2 / guest / "cgroup.procs").read_text().split()]
    assert standby in in_cgroup and mine["proc"] == len(in_cgroup) - 1
    assert next(p for p in ps if p["pid"] == standby)["guest"] == guest

    inside = [int(p) for p in (CGROUP_V2 / guest / "cgroup.procs").read_text().split()]
    vctx(bb_home, "stop", guest)
    nothing_left(guest, [*inside, int(st["init"])])  # type: ignore[call-overload]
    assert vctx(bb_home, "status", guest, check=False).returncode == 3
    assert "not running" in fails(bb_home, 27, "stop", guest)
    assert "not running" in fails(bb_home, 27, "exec", guest, "--", "true")


def test_the_installed_launcher_runs_without_site(bb_home: Path, guest: str) -> None:
    """tools/setup's launcher starts Python without site: the exec fast path
    imports nothing from site-packages, and the full command line makes
    site-packages importable itself.  A relative VCTX_HOME is the caller's."""
    launcher = Path(sys.executable).parent / "vctx"
    assert launcher.read_text().splitlines()[0] == f"#!{sys.executable} -S", "tools/setup writes the launcher"
    vctx(bb_home, "boot", guest)
    env = {**os.environ, "VCTX_HOME": bb_home.name}

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(launcher), *args], input=stdin, capture_output=True, text=True, env=env, cwd=bb_home.parent
        )

    res = run("exec", guest, "--", "sh", "-c", "tr a-z A-Z; exit 5", stdin="fast\n")
    assert (res.stdout, res.returncode) == ("FAST\n", 5)
    # what the fast path costs is what it imports: no site, no os, no click
    res = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", str(launcher), "exec", guest, "--", "true"],
        capture_output=True,
        text=True,
        env=env,
        cwd=bb_home.parent,
    )
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert res.returncode == 0 and "vctx.fast" in imported, res.stderr
    assert not imported & {"site", "os", "click", "vctx.cli", "vctx.enter"}, imported
    status = json.loads(run("status", guest, "--json").stdout)  # click, rich: from site-packages
    assert status["status"] == "running"
    # `vctx boot` asks the running vctxd and takes its reply in marshal: no json (re, enum) either
    vctx(bb_home, "stop", guest)
    res = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", str(launcher), "boot", guest],
        capture_output=True,
        text=True,
        env=env,
        cwd=bb_home.parent,
    )
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert res.returncode == 0 and res.stdout.startswith(f"booted {guest}: init pid "), res.stderr
    assert not imported & {"site", "json", "re", "click", "vctx.control"}, imported
    res = run("boot", guest)  # an error reply, in marshal: one line and its code
    assert (res.returncode, res.stderr) == (26, f"vctx: guest {guest!r} is already running\n")
    res = run("exec", "no-such-guest", "--", "true")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    cowfs = Path(sys.executable).parent / "cowfs"
    assert cowfs.read_text().splitlines()[0] == f"#!{sys.executable} -S"
    res = subprocess.run([str(cowfs), "attr", "show", str(bb_home / "templates")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    vctx(bb_home, "stop", guest)


def test_plain_root(bb_home: Path) -> None:
    """root = "plain": a private copy of the template, bind-mounted with the
    guest's ids (idmapped): no FUSE, the same ids inside, the template
    untouched, and nothing ever links into it."""
    name = f"p-{secrets.token_hex(3)}"
    assert "a plain copy" in vctx(bb_home, "create", name, "-t", "bb", "--root", "plain").stdout
    tree, template = bb_home / "guests" / name / "rootfs", bb_home / "templates" / "bb" / "rootfs"
    try:
        assert not os.path.samestat(os.stat(tree / "bin/busybox"), os.stat(template / "bin/busybox"))
        assert os.getxattr(tree, "trusted.cowfs.private") == b""
        passwd = (template / "etc/passwd").read_bytes()
        vctx(bb_home, "boot", name)
        script = "id -u; stat -c %u /bin/busybox; echo x >> /etc/passwd; mkdir /root/d; touch /root/d/f; cat /proc/self/mountinfo"
        out = vctx(bb_home, "exec", name, "--", "sh", "-c", script).stdout.splitlines()
        assert out[:2] == ["0", "0"]  # the template's root-owned files are the guest root's
        root_line = next(line for line in out[2:] if line.split()[4] == "/")
        assert "idmapped" in root_line and "fuse" not in root_line
        # on disk the ids are the template's, unshifted; only the guest's tree changed
        assert os.stat(tree / "root/d/f").st_uid == 0
        assert (tree / "etc/passwd").read_bytes() == passwd + b"x\n"
        assert (template / "etc/passwd").read_bytes() == passwd
        assert "is running" in fails(bb_home, 26, "delete", name)
        other = bb_home / "guests" / name / "other"
        other.mkdir()
        res = subprocess.run(
            [sys.executable, "-m", "cowfs", "unify", "--store", str(bb_home / "store-p"), str(tree), str(other)],
            capture_output=True,
            text=True,
        )
        assert res.returncode != 0 and "private copies" in res.stderr and res.stderr.count("\n") == 1
        other.rmdir()
        st = state(name)
        assert st is not None
        vctx(bb_home, "stop", name)
        nothing_left(name, [int(st["init"])])  # type: ignore[call-overload]
        assert not (RUN / name).exists()  # the bind mount is gone with its directory
    finally:
        if state(name) is not None:
            vctx(bb_home, "stop", name, check=False)
        vctx(bb_home, "delete", name, check=False)
    assert not (bb_home / "guests" / name).exists()


def test_guest_survives_its_caller_and_reboots_and_halts(bb_home: Path, guest: str) -> None:
    # the vctx command that booted it is gone; one running exec is killed outright
    p = subprocess.Popen(
        [sys.executable, "-m", "vctx", "boot", guest],
        env={**os.environ, "VCTX_HOME": str(bb_home)},
        start_new_session=True,
    )
    p.wait()
    first = state(guest)
    assert first is not None
    runner = subprocess.Popen(
        [sys.executable, "-m", "vctx", "exec", guest, "--", "sleep", "1000"],
        env={**os.environ, "VCTX_HOME": str(bb_home)},
        start_new_session=True,
    )
    assert _inotify_wait(CGROUP_V2 / guest, lambda: len((CGROUP_V2 / guest / "cgroup.procs").read_text().split()) >= 3)
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait()
    assert vctx(bb_home, "exec", guest, "--", "true").returncode == 0

    # reboot(2) inside: the same guest comes back with a new init
    vctx(bb_home, "exec", guest, "--", "reboot")
    assert _inotify_wait(RUN / guest, lambda: (s := state(guest)) is not None and s["init"] != first["init"])
    assert vctx(bb_home, "exec", guest, "--", "hostname").stdout.strip() == guest

    # poweroff inside: it stops, and nothing of it is left
    st = state(guest)
    assert st is not None
    vctx(bb_home, "exec", guest, "--", "poweroff")
    assert _inotify_wait(RUN / guest, lambda: state(guest) is None)
    assert vctx(bb_home, "status", guest, check=False).returncode == 3
    nothing_left(guest, [int(st["init"])])  # type: ignore[call-overload]


def test_sigterm_to_the_daemon_shuts_its_guests_down(bb_home: Path, guest: str) -> None:
    # one daemon for every guest: a host shutdown stops them all cleanly
    vctx(bb_home, "boot", guest)
    st = state(guest)
    assert st is not None
    daemon = int(st["monitor"])  # type: ignore[call-overload]
    other = guest + "-b"
    vctx(bb_home, "create", other, "--template", "bb")
    try:
        vctx(bb_home, "boot", other)
        st2 = state(other)
        assert st2 is not None and st2["monitor"] == daemon
        d = json.loads(vctx(bb_home, "daemon", "status", "--json").stdout)
        assert d["pid"] == daemon and {guest, other} <= set(d["guests"])
        assert "stopped vctxd" in vctx(bb_home, "daemon", "stop").stdout  # SIGTERM, then waits for it
        assert wait_pid_exit(daemon, 1.0)
        assert vctx(bb_home, "daemon", "status", check=False).returncode == 3
        nothing_left(other, [int(st2["init"])])  # type: ignore[call-overload]
    finally:
        vctx(bb_home, "delete", other, check=False)
    nothing_left(guest, [int(st["init"])])  # type: ignore[call-overload]
    log = (bb_home / "guests" / guest / "monitor.log").read_text()
    assert "asked to stop" in log and log.index("asked to stop") < log.rindex(": halt")  # a shutdown, not a kill


def test_killing_the_cgroup_that_started_vctxd_spares_it(bb_home: Path, guest: str) -> None:
    """The first boot starts vctxd; a logout kills that command's cgroup
    (logind, systemd): the daemon, and every guest's mount, must live on."""
    from vctx.cgroups import detect

    v2 = detect().v2
    require(v2 is not None, "needs a cgroup v2 hierarchy")
    assert v2 is not None
    vctx(bb_home, "daemon", "stop", check=False)  # so that this boot starts it
    session = v2 / f"vctx-test-session-{secrets.token_hex(3)}"
    session.mkdir()
    try:
        env = {**os.environ, "VCTX_HOME": str(bb_home)}
        script = f'echo $$ > {session}/cgroup.procs && exec "$0" -m vctx boot "$1"'
        subprocess.run(["sh", "-c", script, sys.executable, guest], env=env, check=True, capture_output=True)
        st = state(guest)
        assert st is not None
        daemon = int(st["monitor"])  # type: ignore[call-overload]
        assert Path(f"/proc/{daemon}/cgroup").read_text().count("/vctxd\n") >= 1
        (session / "cgroup.kill").write_text("1")  # the logout
        assert _alive(daemon)
        assert vctx(bb_home, "exec", guest, "--", "hostname").stdout.strip() == guest
    finally:
        (session / "cgroup.kill").write_text("1")
        _rmdir_when_empty(session)


def _rmdir_when_empty(cg: Path) -> None:
    """rmdir a killed cgroup once its last process is gone (cgroup.events)."""
    ev = cg / "cgroup.events"
    with open(ev) as f:
        while "populated 1" in f.read():
            select.select([], [], [f], 10.0)  # cgroup.events signals a change as an exceptional condition
            f.seek(0)
    cg.rmdir()


def _exec_popen(home: Path, guest: str, script: str) -> subprocess.Popen[str]:
    """A `vctx exec` running script in the guest, once it printed "ready"."""
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vctx",
            "exec",
            guest,
            "--",
            "sh",
            "-c",
            f"{script}; echo ready; while :; do sleep 1; done",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "VCTX_HOME": str(home)},
    )
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


def test_exec_relays_signals_and_hangs_up(bb_home: Path, guest: str) -> None:
    vctx(bb_home, "boot", guest)
    # a signal to `vctx exec` reaches the command; its exit code comes back
    p = _exec_popen(bb_home, guest, "trap 'exit 42' TERM")
    p.send_signal(signal.SIGTERM)
    assert p.wait() == 42
    p.stdout.close()  # type: ignore[union-attr]
    # `vctx exec` killed outright: the command is hung up (it tells a fifo we read from inside)
    vctx(bb_home, "exec", guest, "--", "mkfifo", "/tmp/hup")
    p = _exec_popen(bb_home, guest, "trap 'echo hung up > /tmp/hup; exit 0' HUP")
    p.kill()
    p.wait()
    p.stdout.close()  # type: ignore[union-attr]
    assert vctx(bb_home, "exec", guest, "--", "cat", "/tmp/hup").stdout == "hung up\n"


def _daemon(st: dict[str, object]) -> int:
    return int(st["monitor"])  # type: ignore[call-overload]


def test_a_dead_forker_or_daemon_loses_nothing_for_good(bb_home: Path, guest: str) -> None:
    from vctx import control

    vctx(bb_home, "boot", guest)
    # the forker dies: exec takes the slow path, the next boot starts a new forker
    forker = control.request({"op": "ping"})["forker"]  # type: ignore[index]
    os.kill(forker, signal.SIGKILL)
    assert wait_pid_exit(forker, 10.0)
    assert vctx(bb_home, "exec", guest, "--", "echo", "slow path").stdout == "slow path\n"
    other = guest + "-b"
    vctx(bb_home, "create", other, "--template", "bb")
    try:
        vctx(bb_home, "boot", other)
        assert control.request({"op": "ping"})["forker"] not in (0, forker)  # type: ignore[index]
        assert vctx(bb_home, "exec", other, "--", "echo", "fast path").stdout == "fast path\n"
        vctx(bb_home, "stop", other)
    finally:
        vctx(bb_home, "delete", other, check=False)
    # the daemon is killed: its guest is lost, `vctx stop` clears what is left, a boot starts afresh
    st = state(guest)
    assert st is not None
    os.kill(_daemon(st), signal.SIGKILL)
    assert wait_pid_exit(_daemon(st), 10.0)
    assert vctx(bb_home, "status", guest, check=False).returncode == 3
    vctx(bb_home, "stop", guest)
    nothing_left(guest, [int(st["init"])])  # type: ignore[call-overload]
    vctx(bb_home, "boot", guest)
    st2 = state(guest)
    assert st2 is not None and _daemon(st2) != _daemon(st)
    assert vctx(bb_home, "exec", guest, "--", "hostname").stdout.strip() == guest


def test_limits_stay_inside(bb_home: Path, guest: str) -> None:
    vctx(bb_home, "set", guest, "memory=32M", "pids=20")
    vctx(bb_home, "boot", guest)
    # 100 MiB in one buffer: the OOM killer takes the process, inside the guest only
    res = vctx(bb_home, "exec", guest, "--", "dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1", check=False)
    assert res.returncode == 128 + signal.SIGKILL
    # a fork bomb meets the pids limit
    res = vctx(
        bb_home,
        "exec",
        guest,
        "--",
        "sh",
        "-c",
        "for i in $(seq 50); do sleep 1000 >/dev/null 2>&1 & done; wait",
        check=False,
    )
    assert "can't fork" in res.stderr
    stats = json.loads(vctx(bb_home, "status", guest, "--json").stdout)["stats"]
    assert stats["pids"] <= 20 and stats.get("pids_hits", 0) >= 1
    assert stats.get("memory_hits", 0) + stats.get("memory_oom_kill", 0) >= 1
    assert vctx(bb_home, "exec", guest, "--", "true").returncode == 0  # the guest itself lives on
    # limits change on the running guest
    assert "applied" in vctx(bb_home, "set", guest, "pids=64").stdout
    node = GuestCgroups(guest).node_for("pids")
    assert node is not None
    pids_max = node / "pids.max"
    assert pids_max.read_text().strip() == "64"
    vctx(bb_home, "stop", guest)


def test_rlimits_from_config(bb_home: Path, guest: str) -> None:
    fails(bb_home, 25, "set", guest, "rlimit.bogus=1")
    fails(bb_home, 25, "set", guest, "rlimit.nofile=900:800")  # soft above hard
    vctx(bb_home, "set", guest, "rlimit.nofile=unlimited")  # valid in the file, but above the host's hard limit
    assert "hard limit" in fails(bb_home, 25, "boot", guest)
    vctx(bb_home, "set", guest, "rlimit.nofile=777:888", "rlimit.core=0")
    vctx(bb_home, "boot", guest)
    limits = vctx(bb_home, "exec", guest, "--", "cat", "/proc/1/limits").stdout
    assert any(
        line.startswith("Max open files") and line.split()[3:5] == ["777", "888"] for line in limits.splitlines()
    )
    # exec'd processes get the guest's limits too, not the caller's
    assert vctx(bb_home, "exec", guest, "--", "sh", "-c", "ulimit -n; ulimit -Hn").stdout.split() == ["777", "888"]
    assert "next boot" in vctx(bb_home, "set", guest, "rlimit.nofile=100").stdout
    # init keeps its limits until then; the next exec (served by the guest's standby) has the new ones
    assert vctx(bb_home, "exec", guest, "--", "sh", "-c", "ulimit -n").stdout.split() == ["100"]
    vctx(bb_home, "stop", guest)


def test_enter_through_a_pty(bb_home: Path, guest: str) -> None:
    vctx(bb_home, "boot", guest)
    master, slave = os.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "vctx", "enter", guest],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "VCTX_HOME": str(bb_home), "TERM": "dumb"},
        start_new_session=True,
    )
    os.close(slave)
    out = b""
    sent = False
    while select.select([master], [], [], 60)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break  # EIO: the session ended
        if not chunk:
            break
        out += chunk
        if b"\x1b[6n" in chunk:  # the shell's line editor asks where the cursor is
            os.write(master, b"\x1b[1;1R")
        if not sent and b"# " in out:  # type only once the shell is reading
            os.write(master, b"tty; echo $((6*7)); exit\n")
            sent = True
    assert p.wait() == 0
    text = out.decode(errors="replace")
    assert "42" in text and "/dev/pts/" in text  # a pty of the guest's own devpts


def test_bad_input(bb_home: Path, guest: str, tmp_path: Path) -> None:
    assert "no guest" in fails(bb_home, 21, "boot", "nope")
    assert "bad guest name" in fails(bb_home, 20, "boot", "Nope")
    vctx(bb_home, "boot", guest)
    assert "already running" in fails(bb_home, 26, "boot", guest)
    assert "is running" in fails(bb_home, 26, "delete", guest)
    vctx(bb_home, "stop", guest)
    # a template without an init for its style
    empty = tmp_path / "empty"
    (empty / "etc").mkdir(parents=True)
    vctx(bb_home, "template", "build", "noinit", "--from-dir", str(empty))
    vctx(bb_home, "create", f"{guest}-x", "-t", "noinit", "--init", "busybox")
    try:
        assert "has no /sbin/init" in fails(bb_home, 25, "boot", f"{guest}-x")
    finally:
        vctx(bb_home, "delete", f"{guest}-x")
    assert "unknown key" in fails(bb_home, 25, "set", guest, "colour=blue")
    assert "not a int" in fails(bb_home, 25, "set", guest, "pids=many")
    # a limit this host cannot apply (CPU 99 does not exist): one line, nothing left half set up
    vctx(bb_home, "set", guest, "cpuset=99")
    assert "cpuset" in fails(bb_home, 1, "boot", guest)
    nothing_left(guest, [])


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_debian_systemd_reaches_running(debian_home: Path, suite: str) -> None:
    template = "deb"
    if suite != "bookworm":  # systemd 257: cgroup v2 only, which is all a guest ever sees
        template = f"deb-{suite}"
        cache = DEBS.parent / f"{DEBS.name}-{suite}"
        vctx(
            debian_home, "template", "build", template, "--from", "debian", "--suite", suite, "--cache-dir", str(cache)
        )
    name = f"d-{secrets.token_hex(3)}"
    vctx(debian_home, "create", name, "-t", template)
    try:
        res = vctx(debian_home, "boot", "--wait", name, check=False)
        failed = vctx(debian_home, "exec", name, "--", "systemctl", "--failed", "--no-legend", "--plain").stdout
        assert res.stdout.splitlines()[-1] == f"{name}: running", f"{res.stdout} {res.stderr} failed units: {failed}"
        assert vctx(debian_home, "exec", name, "--", "cat", "/proc/1/comm").stdout.strip() == "systemd"
        st = state(name)
        assert st is not None
        vctx(debian_home, "stop", name)
        nothing_left(name, [int(st["init"])])  # type: ignore[call-overload]
    finally:
        if state(name) is not None:
            vctx(debian_home, "stop", name, check=False)
        vctx(debian_home, "delete", name, check=False)


def test_debian_sysvinit_reaches_its_runlevel(debian_home: Path) -> None:
    vctx(debian_home, "template", "build", "sysv", "--from", "debian", "--init", "sysvinit", "--cache-dir", str(DEBS))
    name = f"s-{secrets.token_hex(3)}"
    vctx(debian_home, "create", name, "-t", "sysv")
    try:
        assert "page_cache: expected one of shared, private" in fails(debian_home, 25, "set", name, "page_cache=some")
        vctx(debian_home, "set", name, "page_cache=private")  # every mount its own, as before passthrough
        vctx(debian_home, "boot", name)
        assert vctx(debian_home, "exec", name, "--", "cat", "/proc/1/comm").stdout.strip() == "init"
        st = state(name)
        assert st is not None
        # sysvinit has no readiness signal: the guest's own utmp says when rc has run
        wait = 'until [ "$(runlevel)" = "N 2" ]; do sleep 0.05; done; runlevel'
        assert vctx(debian_home, "exec", name, "--", "timeout", "60", "sh", "-c", wait).stdout.strip() == "N 2"
        # its own reboot (rc 6, then reboot(2)) brings it back with a new init, to runlevel 2 again
        vctx(debian_home, "exec", name, "--", "reboot")
        assert _inotify_wait(RUN / name, lambda: (s := state(name)) is not None and s["init"] != st["init"])
        assert vctx(debian_home, "exec", name, "--", "timeout", "60", "sh", "-c", wait).stdout.strip() == "N 2"
        st2 = state(name)
        assert st2 is not None
        vctx(debian_home, "stop", name)  # telinit 0, from inside
        nothing_left(name, [int(st["init"]), int(st2["init"])])  # type: ignore[call-overload]
        log = (debian_home / "guests" / name / "monitor.log").read_text()
        assert ": reboot" in log and log.rindex(": halt") > log.index(": reboot")
    finally:
        if state(name) is not None:
            vctx(debian_home, "stop", name, check=False)
        vctx(debian_home, "delete", name, check=False)


# perl (perl-base is in every Debian) makes the raw calls: (name, arguments)
_PROBES = (("keyctl", "0, -3, 0"), ("io_uring_setup", "0, 0"), ("perf_event_open", "0, 0, -1, -1, 0"))


def _probe(home: Path, name: str) -> dict[str, int]:
    """errno of each probe run in the guest (0: the call went through)."""
    nrs = seccomp.NUMBERS[seccomp.ABIS[os.uname().machine][0]]
    script = "".join(f'print "{n}=", (syscall({nrs[n]}, {args}) == -1 ? $!+0 : 0), "\\n";' for n, args in _PROBES)
    out = vctx(home, "exec", name, "--", "perl", "-e", script).stdout
    return {k: int(v) for k, _, v in (line.partition("=") for line in out.split())}


def test_seccomp_refuses_what_no_guest_needs(debian_home: Path) -> None:
    """Every guest process carries the filter, whatever its network; a call
    named in allow_syscalls comes back at the next boot, and only that one."""
    name = f"f-{secrets.token_hex(3)}"
    vctx(debian_home, "create", name, "-t", "deb")
    try:
        vctx(debian_home, "set", name, "init=plain", "command=/bin/sleep infinity", "network=none")
        assert "not a system call vctx refuses" in fails(debian_home, 25, "set", name, "allow_syscalls=openat")
        vctx(debian_home, "boot", name)
        status = vctx(debian_home, "exec", name, "--", "grep", "Seccomp:", "/proc/1/status", "/proc/self/status")
        assert status.stdout.count("\t2\n") == 2  # init and an exec'd process
        assert _probe(debian_home, name) == {
            "keyctl": errno.ENOSYS,
            "io_uring_setup": errno.ENOSYS,
            "perf_event_open": errno.EPERM,
        }
        out = vctx(debian_home, "set", name, "allow_syscalls=keyctl,io_uring_setup").stdout
        assert "allow_syscalls at the next boot" in out
        assert _probe(debian_home, name)["keyctl"] == errno.ENOSYS  # the booted filter stays until then
        vctx(debian_home, "restart", name)
        got = _probe(debian_home, name)
        assert got["keyctl"] != errno.ENOSYS  # the guest's own session keyring, or a refusal from the kernel
        assert got["io_uring_setup"] == errno.EFAULT  # it got as far as reading its (null) parameters
        assert got["perf_event_open"] == errno.EPERM
        vctx(debian_home, "stop", name)
    finally:
        if state(name) is not None:
            vctx(debian_home, "stop", name, check=False)
        vctx(debian_home, "delete", name, check=False)


def test_autostart_boots_marked_guests_and_stop_all_stops_every_guest(bb_home: Path, tmp_path: Path) -> None:
    """The host's boot and shutdown (vctx.service): marked guests come up,
    one that cannot boot is reported without holding the others back, and
    `stop --all` leaves nothing of any guest."""
    tag = secrets.token_hex(2)
    a, b, c, broken = (f"as-{x}-{tag}" for x in "abcd")
    vctx(bb_home, "create", a, "-t", "bb", "--autostart")
    for n in (b, c, broken):
        vctx(bb_home, "create", n, "-t", "bb")
    try:
        vctx(bb_home, "set", c, "autostart=yes")
        assert json.loads(vctx(bb_home, "status", c, "--json", check=False).stdout)["autostart"] is True
        assert "autostart: expected yes or no" in fails(bb_home, 25, "set", b, "autostart=maybe")
        # a marked guest whose limits this host cannot apply (CPU 99 does not exist)
        vctx(bb_home, "set", broken, "autostart=yes", "cpuset=99")

        res = vctx(bb_home, "boot", "--autostart", check=False)
        assert res.returncode == 1, res.stderr
        assert f"{a}: booted" in res.stdout and f"{c}: booted" in res.stdout
        assert broken in res.stderr and "Traceback" not in res.stderr
        assert state(a) is not None and state(c) is not None
        assert state(b) is None and state(broken) is None
        nothing_left(broken, [])

        vctx(bb_home, "set", broken, "autostart=no")
        again = vctx(bb_home, "boot", "--autostart")
        assert f"{a}: already running" in again.stdout
        assert "give no NAME" in fails(bb_home, 2, "boot", a, "--autostart")

        vctx(bb_home, "boot", b)
        pids = [int(str(state(n)["init"])) for n in (a, b, c)]  # type: ignore[index]
        out = vctx(bb_home, "stop", "--all", "--timeout", "10").stdout
        assert all(f"{n}: stopped" in out for n in (a, b, c)), out
        for n in (a, b, c):
            nothing_left(n, pids)
        assert vctx(bb_home, "stop", "--all").stdout == ""  # nothing running: nothing to do, and no error
    finally:
        for n in (a, b, c, broken):
            if state(n) is not None:
                vctx(bb_home, "stop", n, "--timeout", "10", check=False)
            vctx(bb_home, "delete", n, check=False)


def test_systemd_unit_verifies(bb_home: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "needs systemd-analyze (package systemd)")
    text = vctx(bb_home, "unit", "--stop-timeout", "90").stdout
    unit = tmp_path / "vctx.service"
    unit.write_text(text)
    res = subprocess.run([str(analyze), "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and "ignoring" not in res.stderr and "Unknown" not in res.stderr, res.stderr
    execs = dict(line.split("=", 1) for line in text.splitlines() if line.startswith(("ExecStart=", "ExecStop=")))
    start, stop = execs["ExecStart"].split(), execs["ExecStop"].split()
    assert os.access(start[0], os.X_OK) and start[1:] == ["boot", "--autostart"]
    assert stop[1:] == ["stop", "--all", "--timeout", "90"]
    assert f"Environment=VCTX_HOME={bb_home}" in text
