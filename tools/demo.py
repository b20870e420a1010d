"""The main job: a Debian template, guests booted on copy-on-write clones of
it, shown working, made to drift apart, unified back, and the disk saved.

Everything runs in a throw-away vctx home (--keep to look around after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vctx.debian import CACHE

VENV_BIN = Path(sys.executable).parent
VCTX = str(VENV_BIN / "vctx")
COWFS = str(VENV_BIN / "cowfs")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(args, text=True, capture_output=True)
    if check and res.returncode != 0:
        sys.exit(f"demo: {' '.join(args[:4])} failed: {res.stderr.strip()}")
    return res


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--guests", type=int, default=10)
    ap.add_argument("--busybox", action="store_true", help="A busybox template instead of Debian (no mirror needed).")
    ap.add_argument("--keep", action="store_true", help="Leave the home, guests stopped, for a look around.")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (sudo tools/demo)")
    home = Path(tempfile.mkdtemp(prefix="vctx-demo-", dir="/var/tmp"))
    os.environ["VCTX_HOME"] = str(home)
    names = [f"guest{i}" for i in range(args.guests)]
    try:
        t0 = time.monotonic()
        if args.busybox:
            step("template from busybox-static")
            print(sh(VCTX, "template", "build", "tpl", "--from", "busybox").stdout.strip())
        else:
            step("template: Debian bookworm with systemd, by debootstrap (.debs cached in /var/cache/vctx/debs)")
            print(
                sh(
                    VCTX, "template", "build", "tpl", "--from", "debian", "--cache-dir", str(CACHE / "debs")
                ).stdout.strip()
            )
        print(f"   ({time.monotonic() - t0:.1f}s)")

        step(f"{len(names)} guests: copy-on-write clones of the template")
        t0 = time.monotonic()
        for n in names:
            sh(VCTX, "create", n, "-t", "tpl")
        print(f"   created in {time.monotonic() - t0:.2f}s")
        print(
            sh(
                COWFS, "du", str(home / "templates/tpl/rootfs"), *(str(home / "guests" / n / "rootfs") for n in names)
            ).stdout.splitlines()[-1]
        )

        step("boot them all: each its own init, namespaces, cgroups, cowfs root")
        t0 = time.monotonic()
        for n in names:
            sh(VCTX, "boot", n)
        print(f"   booted {len(names)} guests in {time.monotonic() - t0:.2f}s")
        if not args.busybox:
            t0 = time.monotonic()
            states = {
                sh(VCTX, "exec", n, "--", "systemctl", "is-system-running", "--wait", check=False).stdout.strip()
                for n in names
            }
            print(f"   systemd in every guest: {', '.join(sorted(states))} ({time.monotonic() - t0:.2f}s more)")
        print(sh(VCTX, "list").stdout)

        step("inside a guest")
        g = names[0]
        for cmd in (
            ["hostname"],
            ["id"],
            ["cat", "/proc/self/uid_map"],
            ["sh", "-c", "echo $(ls /proc | grep -c '^[0-9]') processes visible"],
            ["cat", "/etc/debian_version"],
        ):
            out = sh(VCTX, "exec", g, "--", *cmd, check=False)
            print(f"   {g}$ {' '.join(cmd)}\n     {(out.stdout or out.stderr).strip()}")
        print(
            "   (guest root is host uid",
            json.loads(sh(VCTX, "status", g, "--json").stdout)["ctx"] * 65536,
            "; the host's processes are invisible)",
        )

        step("a write breaks the link for that guest only")
        sh(VCTX, "exec", g, "--", "sh", "-c", "echo changed by guest0 >> /etc/issue")
        print("   guest0:", sh(VCTX, "exec", g, "--", "tail", "-n1", "/etc/issue").stdout.strip())
        print(
            "   guest1:", sh(VCTX, "exec", names[1], "--", "tail", "-n1", "/etc/issue").stdout.strip() or "(unchanged)"
        )
        print("   template:", (home / "templates/tpl/rootfs/etc/issue").read_text().strip().splitlines()[-1])

        step("stop them all: nothing of any guest remains")
        t0 = time.monotonic()
        for n in names:
            sh(VCTX, "stop", n)
        rows = json.loads(sh(VCTX, "list", "--json").stdout)
        left = sum(r["proc"] for r in rows) + sum(r["status"] == "running" for r in rows)
        print(f"   stopped in {time.monotonic() - t0:.2f}s; guest processes left: {left}")

        step("drift: each guest gets the same new files by its own copy (as a package install would)")
        blob = os.urandom(4 << 20)
        for n in names:
            d = home / "guests" / n / "rootfs/usr/local/lib/app"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(5):
                (d / f"part{i}.bin").write_bytes(blob[i * 700_000 :])
                os.utime(d / f"part{i}.bin", (1_700_000_000, 1_700_000_000))  # as dpkg sets them
        trees = [str(home / "guests" / n / "rootfs") for n in names]
        print("   " + sh(COWFS, "du", str(home / "templates/tpl/rootfs"), *trees).stdout.splitlines()[-1])

        step("unify: fold equal files back into shared, marked inodes")
        print(sh(COWFS, "unify", "--store", str(home / "store"), *trees).stdout.rstrip())
        print()
        print(sh(COWFS, "du", str(home / "templates/tpl/rootfs"), *trees, str(home / "store")).stdout.rstrip())

        step("and they boot again on the unified trees")
        for n in names[:3]:
            sh(VCTX, "boot", n)
            print(f"   {n}: {sh(VCTX, 'exec', n, '--', 'md5sum', '/usr/local/lib/app/part0.bin').stdout.split()[0]}")
            sh(VCTX, "stop", n)
    finally:
        for n in names:
            subprocess.run([VCTX, "stop", n], capture_output=True)
        if args.keep:
            print(f"\nkept: VCTX_HOME={home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
