"""Guests against their peers, in one run, contenders alternating.

1. Boot a Debian bookworm (or --suite trixie) guest until systemd says `running` (or
   `degraded`): vctx boot --wait against systemd-nspawn --boot and LXC
   (lxc-start) on plain copies of the same tree.  vctx's first boot, which
   starts the host daemon, is shown apart; vctx on a plain root (a private
   copy, idmapped bind mount: no cowfs) shows what cowfs costs, and cowfs
   with page_cache = "private" what its shared page cache costs.  LXC also
   boots on copy-on-write roots of the template: kernel overlayfs, and
   fuse-overlayfs (a FUSE root like cowfs, served by a C daemon), to show
   what a FUSE root costs a peer.  Also the page cache each cowfs guest's
   memory cgroup is charged once it runs.
2. Run `true` in a running guest: vctx exec against nsenter -a (the floor:
   it joins no cgroup), lxc-attach to the Debian container, and crun exec
   and runc exec of a busybox bundle.
3. Host-side memory of N idle busybox guests: what vctx keeps on the host
   for them (the daemon and its forker, PSS), per guest.

Peers that are not installed are skipped (apt install systemd-container lxc
crun runc).
Run as root: sudo .venv/bin/python benchmarks/guests.py [--reps N] [--idle N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cowfs.sys import umount as sys_umount

VCTX = str(Path(sys.executable).parent / "vctx")
DEBS = Path("/var/cache/vctx/debs")
RUN = Path("/run/vctx")


def run(*cmd: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    res: subprocess.CompletedProcess[str] = subprocess.run(list(cmd), text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if check and res.returncode != 0:
        sys.exit(f"benchmarks/guests.py: {' '.join(cmd[:4])} failed: {res.stderr.strip()[-300:]}")
    return res


def timed(*cmd: str) -> float:
    t0 = time.perf_counter()
    run(*cmd)
    return time.perf_counter() - t0


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.1f} ms"


def report(times: dict[str, list[float]], mine: str, label: str) -> None:
    """Each contender's median, then the ratio of mine to each of the others."""
    for k, v in times.items():
        print(f"  {k:<40} {med(v)}")
    ours = statistics.median(times[mine])
    for k, v in times.items():
        if k != mine:
            print(f"  {label} / {k} = {ours / statistics.median(v):.2f}")


def until_running(ask: list[str], t0: float) -> float:
    """Ask systemd inside until it answers running/degraded (its bus comes
    up a moment after init starts: until then the question fails at once)."""
    while True:
        res = run(*ask, "systemctl", "is-system-running", "--wait", check=False)
        if res.stdout.strip() in ("running", "degraded"):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > 60:
            return float("nan")
        time.sleep(0.01)


def nspawn_boot(tree: Path) -> float:
    """systemd-nspawn --boot (asked through nsenter: hosts without systemd as
    PID 1 have no machined to ask)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        ["systemd-nspawn", "-q", "--boot", "-D", str(tree), "--register=no", "--keep-unit"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    leader = 0
    try:
        while not leader:
            kids = run("pgrep", "-P", str(p.pid), check=False).stdout.split()
            leader = int(kids[0]) if kids else 0
            if p.poll() is not None:
                return float("nan")
        return until_running(["nsenter", "-a", "-t", str(leader)], t0)
    finally:
        # systemd halts on SIGRTMIN+3; one sent the moment it says `running`
        # was seen lost once (the run hung here): sent again until it goes
        for _ in range(10):
            if leader:
                run("kill", "-RTMIN+3", str(leader), check=False)
            try:
                p.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            p.kill()
            p.wait()


class Lxc:
    """An LXC container of the Debian tree; rootfs is LXC's spec of its
    root (dir:PATH, or overlay:LOWER:UPPER, which LXC mounts itself)."""

    def __init__(self, base: Path, name: str, rootfs: str) -> None:
        self.base, self.name = base, name
        (base / self.name).mkdir(parents=True)
        (base / self.name / "config").write_text(
            "lxc.include = /usr/share/lxc/config/common.conf\n"
            f"lxc.uts.name = {self.name}\n"
            f"lxc.rootfs.path = {rootfs}\n"
            "lxc.net.0.type = empty\n"
            "lxc.apparmor.profile = unconfined\n"
            "lxc.console.path = none\n"
            "lxc.tty.max = 0\n"
            "lxc.mount.auto = proc:mixed sys:ro cgroup:mixed\n"
        )
        self.attach = ["lxc-attach", "-n", self.name, "-P", str(base), "--"]

    def start(self) -> None:
        run("lxc-start", "-n", self.name, "-P", str(self.base), "-d")

    def boot(self) -> float:
        t0 = time.perf_counter()
        self.start()
        return until_running(self.attach, t0)

    def stop(self) -> None:
        run("lxc-stop", "-n", self.name, "-P", str(self.base), "-k", check=False)


class LxcOnFuse(Lxc):
    """LXC on a FUSE copy-on-write root like a vctx guest's, served by a C
    daemon: fuse-overlayfs with the template as its lower layer, mounted
    afresh for each boot (as vctx mounts cowfs) and inside the timing; the
    upper layer, the guest's changes, is kept between boots."""

    def __init__(self, base: Path, name: str, template: Path) -> None:
        self.dirs = {k: base / f"{name}-{k}" for k in ("upper", "work", "root")}
        for d in self.dirs.values():
            d.mkdir(parents=True)
        self.lower = template
        super().__init__(base, name, f"dir:{self.dirs['root']}")

    def start(self) -> None:
        d = self.dirs
        run(
            "fuse-overlayfs",
            "-o",
            f"lowerdir={self.lower},upperdir={d['upper']},workdir={d['work']},allow_other",
            str(d["root"]),
        )
        super().start()

    def stop(self) -> None:
        super().stop()
        if os.path.ismount(self.dirs["root"]):
            sys_umount(str(self.dirs["root"]))


def oci_bundle(base: Path, rootfs: Path) -> Path:
    """A busybox bundle for crun and runc: `crun spec`, no terminal, sleeping."""
    bundle = base / "oci"
    bundle.mkdir()
    run("cp", "-a", str(rootfs), str(bundle / "rootfs"))
    run("crun", "spec", cwd=str(bundle))
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sleep", "100000"]
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def daemon() -> dict[str, object] | None:
    from vctx import control

    return control.request({"op": "ping"}, 10.0, start=False)


def stop_idle_daemon() -> bool:
    """So that the next boot starts vctxd: True if none runs now."""
    d = daemon()
    if d is None:
        return True
    if d["guests"]:
        return False
    pid = int(d["pid"])  # type: ignore[call-overload]
    os.kill(pid, signal.SIGTERM)
    from cowfs.daemon import wait_pid_exit

    return wait_pid_exit(pid, 30.0)


def host_side(d: dict[str, object]) -> int:
    return pss(int(d["pid"])) + pss(int(d["forker"]))  # type: ignore[call-overload]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--idle", type=int, default=50, help="busybox guests for the memory figure")
    ap.add_argument("--only", choices=("boot", "exec", "memory"), action="append", help="run this part (repeatable)")
    ap.add_argument("--suite", choices=("bookworm", "trixie"), default="bookworm", help="the Debian guest's release")
    args = ap.parse_args()
    parts = set(args.only or ("boot", "exec", "memory"))
    if os.geteuid() != 0:
        sys.exit("benchmarks/guests.py: run as root")
    home = Path(tempfile.mkdtemp(prefix="vctx-guests-", dir="/var/tmp"))
    os.environ["VCTX_HOME"] = str(home)
    lxc: Lxc | None = None
    cow_lxcs: dict[str, Lxc] = {}  # LXC on copy-on-write roots of the template
    oci: list[tuple[str, str]] = []
    try:
        debs = DEBS if args.suite == "bookworm" else DEBS.parent / f"{DEBS.name}-{args.suite}"
        run(VCTX, "template", "build", "deb", "--from", "debian", "--suite", args.suite, "--cache-dir", str(debs))
        run(VCTX, "template", "build", "bb", "--from", "busybox")
        run(VCTX, "create", "deb1", "-t", "deb")
        run(VCTX, "create", "debplain", "-t", "deb", "--root", "plain")
        run(VCTX, "create", "debpriv", "-t", "deb")
        run(VCTX, "set", "debpriv", "page_cache=private")
        have_nspawn = shutil.which("systemd-nspawn") is not None
        if have_nspawn and "boot" in parts:
            run("cp", "-a", str(home / "templates/deb/rootfs"), str(home / "nspawn-root"))
        if shutil.which("lxc-start"):
            run("cp", "-a", str(home / "templates/deb/rootfs"), str(home / "lxc-root"))
            lxc = Lxc(home / "lxc", "deb", f"dir:{home / 'lxc-root'}")
            if "boot" in parts:
                tmpl = home / "templates/deb/rootfs"
                cow_lxcs["lxc-start, overlayfs root"] = Lxc(
                    home / "lxc", "debovl", f"overlay:{tmpl}:{home / 'ovl-upper'}"
                )
                if shutil.which("fuse-overlayfs"):
                    cow_lxcs["lxc-start, fuse-overlayfs root"] = LxcOnFuse(home / "lxc", "debfuse", tmpl)
        if "boot" in parts:
            boot(args.reps, home, have_nspawn, lxc, cow_lxcs, args.suite)
        if "exec" in parts:
            exec_true(args.reps, home, lxc, oci)
        if "memory" in parts:
            memory(args.idle)
    finally:
        for rt, cid in oci:
            subprocess.run([rt, "delete", "-f", cid], capture_output=True)
        for c in [lxc, *cow_lxcs.values()]:
            if c is not None:
                c.stop()
        for g in (home / "guests").glob("*"):
            subprocess.run([VCTX, "stop", g.name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def boot(reps: int, home: Path, have_nspawn: bool, lxc: Lxc | None, cow_lxcs: dict[str, Lxc], suite: str) -> None:
    print(f"## boot Debian {suite} (systemd) to running ({reps} rounds, alternating)")
    cold = None
    if stop_idle_daemon():
        cold = timed(VCTX, "boot", "--wait", "deb1")
        run(VCTX, "stop", "deb1")
    # the vctx guests: (label, guest); the cowfs ones' page cache is read while they run
    guests = [
        ("vctx boot --wait", "deb1"),
        ("vctx boot --wait, private page cache", "debpriv"),
        ("vctx boot --wait, plain root", "debplain"),
    ]
    boots: dict[str, list[float]] = {label: [] for label, _ in guests}
    cache: dict[str, list[float]] = {"deb1": [], "debpriv": []}
    if have_nspawn:
        boots["systemd-nspawn --boot"] = []
    if lxc is not None:
        boots["lxc-start"] = []
    for label in cow_lxcs:
        boots[label] = []
    for _ in range(reps):
        for label, guest in guests:
            boots[label].append(timed(VCTX, "boot", "--wait", guest))
            if guest in cache:
                cache[guest].append(page_cache_mib(guest))
            run(VCTX, "stop", guest)
        if have_nspawn:
            boots["systemd-nspawn --boot"].append(nspawn_boot(home / "nspawn-root"))
        if lxc is not None:
            boots["lxc-start"].append(lxc.boot())
            lxc.stop()
        for label, c in cow_lxcs.items():
            boots[label].append(c.boot())
            c.stop()
    if cold is not None:
        print(f"  {'vctx, first boot (starts vctxd)':<40} {cold * 1000:8.1f} ms")
    report(boots, "vctx boot --wait", "vctx")  # (its ratio to the private page cache too)
    plain = statistics.median(boots["vctx boot --wait, plain root"])
    for k in ("systemd-nspawn --boot", "lxc-start", *cow_lxcs):
        if k in boots:
            print(f"  vctx plain root / {k} = {plain / statistics.median(boots[k]):.2f}")
    shared_mib, private_mib = statistics.median(cache["deb1"]), statistics.median(cache["debpriv"])
    print(
        f"  page cache charged to a running cowfs guest: shared {shared_mib:.1f} MiB, private {private_mib:.1f} MiB"
        f" ({private_mib - shared_mib:.1f} MiB less per guest)"
    )


def page_cache_mib(name: str) -> float:
    """The page cache the guest's memory cgroup is charged: its own files'
    pages and the shared ones it was first to read."""
    for path, key in (
        (f"/sys/fs/cgroup/memory/vctx/{name}/memory.stat", "total_cache"),
        (f"/sys/fs/cgroup/vctx/{name}/memory.stat", "file"),
    ):
        if os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v) / (1 << 20)
    return float("nan")


def exec_true(reps: int, home: Path, lxc: Lxc | None, oci: list[tuple[str, str]]) -> None:
    """Adds the OCI containers it starts to oci, for the caller to delete."""
    print(f"\n## exec `true` in a running guest ({reps * 10} rounds, alternating)")
    run(VCTX, "create", "bb1", "-t", "bb")
    run(VCTX, "boot", "bb1")
    init = json.loads(run(VCTX, "status", "bb1", "--json").stdout)["init_pid"]
    execs: dict[str, list[str]] = {
        "vctx exec": [VCTX, "exec", "bb1", "--", "true"],
        "nsenter -a": ["nsenter", "-a", "-t", str(init), "true"],
    }
    if lxc is not None:
        lxc.start()
        until_running(lxc.attach, time.perf_counter())
        execs["lxc-attach"] = [*lxc.attach, "true"]
    if shutil.which("crun"):
        bundle = oci_bundle(home, home / "templates/bb/rootfs")
        for rt in ("crun", "runc"):
            if shutil.which(rt):
                # the container keeps the stdio it is given: not our pipes
                with tempfile.TemporaryFile("w+") as err:
                    cmd = [rt, "run", "-d", "-b", str(bundle), f"bench-{rt}"]
                    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
                    if res.returncode != 0:  # crun refuses hybrid cgroup hosts
                        err.seek(0)
                        print(f"  ({rt} skipped: {err.read().strip().splitlines()[-1:]})")
                        continue
                oci.append((rt, f"bench-{rt}"))
                execs[f"{rt} exec"] = [rt, "exec", f"bench-{rt}", "true"]
    times: dict[str, list[float]] = {k: [] for k in execs}
    for _ in range(reps * 10):
        for k, cmd in execs.items():
            times[k].append(timed(*cmd))
    report(times, "vctx exec", "vctx exec")
    run(VCTX, "stop", "bb1")
    if lxc is not None:
        lxc.stop()


def memory(idle: int) -> None:
    print(f"\n## host-side memory of {idle} idle busybox guests (vctxd + forker, PSS)")
    names = [f"idle{i}" for i in range(idle)]
    for n in names:
        run(VCTX, "create", n, "-t", "bb")
    run(VCTX, "boot", names[0])
    d = daemon()
    assert d is not None
    one = host_side(d)
    for n in names[1:]:
        run(VCTX, "boot", n)
    d = daemon()
    assert d is not None
    total = host_side(d)
    print(f"  with 1 guest: {one / 2**20:.1f} MiB; with {len(names)}: {total / 2**20:.1f} MiB")
    print(f"  per guest: {total / len(names) / 2**20:.2f} MiB (target < 2 MiB)")
    print(f"  each guest past the first adds {(total - one) / (len(names) - 1) / 2**20:.2f} MiB")
    listed = json.loads(run(VCTX, "list", "--json").stdout)
    gone = sorted(g["name"] for g in listed if g["name"] in names and g["status"] != "running")
    if gone:
        print(f"  ({len(gone)} of {len(names)} had stopped by the end: {', '.join(gone)}; see their console.log)")
    run(VCTX, "stop", "--all")


if __name__ == "__main__":
    main()
