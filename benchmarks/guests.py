"""Guests against their peers, in one run, contenders alternating.

1. Boot a Debian bookworm (systemd) guest to `running`: vctx boot --wait
   against systemd-nspawn --boot on a plain copy of the same tree.
2. Run `true` in a running guest: vctx exec against nsenter -a (the floor)
   and crun exec of a busybox bundle.
3. Host-side memory per idle busybox guest (the monitors' PSS: cowfs
   daemon + init's parent), over N guests.

Peers that are not installed are skipped (apt install systemd-container crun).
Run as root: sudo .venv/bin/python benchmarks/guests.py [--reps N] [--idle N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VCTX = str(Path(sys.executable).parent / "vctx")
DEBS = Path("/var/cache/vctx/debs")


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


def nspawn_boot(tree: Path) -> float:
    """systemd-nspawn --boot, until systemctl in it says running (asked through
    nsenter: hosts without systemd as PID 1 have no machined to ask)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        ["systemd-nspawn", "-q", "--boot", "-D", str(tree), "--register=no", "--keep-unit"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    leader = 0
    try:
        while True:
            if not leader:
                kids = run("pgrep", "-P", str(p.pid), check=False).stdout.split()
                leader = int(kids[0]) if kids else 0
            if leader:
                res = run("nsenter", "-a", "-t", str(leader), "systemctl", "is-system-running", "--wait", check=False)
                if res.stdout.strip() in ("running", "degraded"):
                    return time.perf_counter() - t0
            if p.poll() is not None or time.perf_counter() - t0 > 60:
                return float("nan")
            time.sleep(0.02)
    finally:
        if leader:
            run("kill", "-RTMIN+3", str(leader), check=False)
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--idle", type=int, default=50, help="busybox guests for the memory figure")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/guests.py: run as root")
    home = Path(tempfile.mkdtemp(prefix="vctx-guests-", dir="/var/tmp"))
    os.environ["VCTX_HOME"] = str(home)
    try:
        run(VCTX, "template", "build", "deb", "--from", "debian", "--cache-dir", str(DEBS))
        run(VCTX, "template", "build", "bb", "--from", "busybox")
        run(VCTX, "create", "deb1", "-t", "deb")
        plain = home / "plain"
        run("cp", "-a", str(home / "templates/deb/rootfs"), str(plain))
        have_nspawn = shutil.which("systemd-nspawn") is not None

        print(f"## boot Debian bookworm (systemd) to running ({args.reps} rounds, alternating)")
        boots: dict[str, list[float]] = {"vctx boot --wait": []}
        if have_nspawn:
            boots["systemd-nspawn --boot"] = []
        for _ in range(args.reps):
            boots["vctx boot --wait"].append(timed(VCTX, "boot", "--wait", "deb1"))
            run(VCTX, "stop", "deb1")
            if have_nspawn:
                boots["systemd-nspawn --boot"].append(nspawn_boot(plain))
        for k, v in boots.items():
            print(f"  {k:<24} {med(v)}")
        if have_nspawn:
            r = statistics.median(boots["vctx boot --wait"]) / statistics.median(boots["systemd-nspawn --boot"])
            print(f"  vctx / nspawn = {r:.2f}")

        print(f"\n## exec `true` in a running guest ({args.reps * 10} rounds, alternating)")
        run(VCTX, "create", "bb1", "-t", "bb")
        run(VCTX, "boot", "bb1")
        init = json.loads(run(VCTX, "status", "bb1", "--json").stdout)["init_pid"]
        execs: dict[str, list[str]] = {
            "vctx exec": [VCTX, "exec", "bb1", "--", "true"],
            "nsenter -a": ["nsenter", "-a", "-t", str(init), "true"],
        }
        times: dict[str, list[float]] = {k: [] for k in execs}
        for _ in range(args.reps * 10):
            for k, cmd in execs.items():
                times[k].append(timed(*cmd))
        for k, v in times.items():
            print(f"  {k:<24} {med(v)}")
        print(
            f"  vctx exec / nsenter = {statistics.median(times['vctx exec']) / statistics.median(times['nsenter -a']):.1f}"
        )
        run(VCTX, "stop", "bb1")

        print(f"\n## host-side memory of {args.idle} idle busybox guests")
        names = [f"idle{i}" for i in range(args.idle)]
        for n in names:
            run(VCTX, "create", n, "-t", "bb")
            run(VCTX, "boot", n)
        pss = 0
        for n in names:
            mon = json.loads(run(VCTX, "status", n, "--json").stdout)["monitor_pid"]
            for line in Path(f"/proc/{mon}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        print(f"  monitor PSS per guest: {pss / len(names) / 2**20:.1f} MiB (target < 2 MiB)")
        for n in names:
            run(VCTX, "stop", n)
    finally:
        for g in (home / "guests").glob("*"):
            subprocess.run([VCTX, "stop", g.name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
