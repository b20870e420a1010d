"""The main job: build a template, clone guests onto it, serve them with cowfs,
run programs from them, change one, and show the disk saved.

Guest boot (vctx boot) is not built yet; guests here are cowfs mounts that
programs are run from with chroot — the file-system half of a guest, real.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vctx.debian import minbase

VENV_BIN = Path(sys.executable).parent
COWFS = str(VENV_BIN / "cowfs")


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def debian_template(dest: Path) -> str:
    print("Debian bookworm minbase from the cache (debootstrapped on first use) ...", flush=True)
    run("cp", "-a", str(minbase("bookworm")), str(dest))
    return "Debian bookworm (debootstrap minbase)"


def busybox_template(dest: Path) -> str:
    for d in ("bin", "etc", "tmp", "root", "proc", "dev"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", dest / "bin/busybox")
    run("chroot", str(dest), "/bin/busybox", "--install", "-s", "/bin")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/debian_version").write_text("busybox\n")
    return "busybox-static"


def disk_usage(trees: list[Path]) -> tuple[int, int]:
    """(apparent bytes, bytes on disk counting each inode once) over trees."""
    apparent, seen, used = 0, set(), 0
    for t in trees:
        for top, dirs, files in os.walk(t):
            for n in dirs + files:
                st = os.lstat(os.path.join(top, n))
                apparent += st.st_blocks * 512
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    used += st.st_blocks * 512
    return apparent, used


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--guests", type=int, default=10)
    ap.add_argument("--work", default="/var/tmp/vctx-demo")
    ap.add_argument("--busybox", action="store_true", help="a tiny busybox template instead of Debian")
    ap.add_argument("--keep", action="store_true", help="leave the trees for inspection")
    args = ap.parse_args()

    work = Path(args.work)
    for m in sorted(work.glob("mnt/*")):
        subprocess.run([COWFS, "umount", "--lazy", str(m)], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    (work / "mnt").mkdir(parents=True)
    template = work / "template"

    print("== 1. template")
    try:
        kind = busybox_template(template) if args.busybox else debian_template(template)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"   Debian template unavailable ({e}); using busybox-static")
        shutil.rmtree(template, ignore_errors=True)
        kind = busybox_template(template)
    print(run(COWFS, "attr", "set", "--iunlink", "-R", str(template)).stdout.strip())
    _, tpl_bytes = disk_usage([template])
    print(f"   {kind}: {mib(tpl_bytes)} on disk")

    print(f"== 2. clone {args.guests} guests (hard links to the template, marked)")
    trees = []
    for i in range(args.guests):
        tree = work / f"guest{i:02d}"
        out = run(COWFS, "clone", str(template), str(tree)).stdout.strip()
        trees.append(tree)
        if i == 0:
            print(f"   guest00: {out}")

    print("== 3. serve each guest with cowfs and run programs from it")
    mnts = []
    t0 = time.monotonic()
    for i, tree in enumerate(trees):
        m = work / "mnt" / f"guest{i:02d}"
        m.mkdir()
        run(COWFS, "mount", str(tree), str(m))
        mnts.append(m)
    print(f"   {len(mnts)} mounts ready in {time.monotonic() - t0:.2f}s")
    for i, m in enumerate(mnts):
        run("chroot", str(m), "/bin/sh", "-c", f"echo guest{i:02d} > /etc/hostname")
    for i in (0, len(mnts) - 1):
        out = run(
            "chroot",
            str(mnts[i]),
            "/bin/sh",
            "-c",
            "echo $(cat /etc/hostname) runs $(cat /etc/debian_version) with $(ls /usr/bin /bin | wc -l) programs",
        ).stdout
        print(f"   {out.strip()}")

    print("== 4. a guest changes a shared file: only its own copy changes")
    victim = "etc/debian_version"
    with open(mnts[0] / victim, "a") as f:
        f.write("changed by guest00\n")
    print(f"   guest00 sees:  {(mnts[0] / victim).read_text().splitlines()[-1]!r}")
    print(f"   guest01 sees:  {(mnts[1] / victim).read_text().splitlines()[-1]!r}")
    print(f"   template has:  {(template / victim).read_text().splitlines()[-1]!r}")
    shared = sum(1 for t in trees if os.stat(t / victim).st_ino == os.stat(template / victim).st_ino)
    print(f"   {shared} of {len(trees)} guests still share the template's inode")

    print("== 5. disk")
    apparent, _ = disk_usage(trees)
    _, used_all = disk_usage([template, *trees])
    beyond = used_all - tpl_bytes
    print(f"   {len(trees)} guests as full copies would take: {mib(apparent)}")
    print(f"   {len(trees)} guests take beyond the template:  {mib(beyond)} (directories, symlinks, private copies)")
    saved = 1 - used_all / (apparent + tpl_bytes)
    print(
        f"   template + {len(trees)} guests: {mib(used_all)} instead of {mib(tpl_bytes + apparent)}: {saved:.0%} saved"
    )

    for m in mnts:
        run(COWFS, "umount", str(m))
    print(f"== done: {len(mnts)} mounts unmounted cleanly")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
