"""cowfs against its peers, side by side in one run, contenders alternating.

Contenders: native ext4 (a plain copy of the tree), kernel overlayfs and
fuse-overlayfs (template as the lower layer), cowfs (a clone of the template,
every file a marked hard link), as mounted by default (shared files read
through the template's page cache) and with --private-cache.  The tree is a debootstrapped Debian bookworm
minbase plus a 1 GiB and a 100 MiB file, on a fresh ext4 made for the run
(loopfs.py says why).  Prints medians and ratios to native (and, for the
targets, to fuse-overlayfs).

Run as root: sudo .venv/bin/python benchmarks/fs.py [--reps N] [--big-mib N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loopfs import fresh_ext4  # benchmarks/, the script's own directory

from cowfs.sys import mount as sys_mount
from cowfs.sys import umount as sys_umount
from vctx.debian import minbase

COWFS = str(Path(sys.executable).parent / "cowfs")


def sh(cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(cmd, shell=True, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class Contender:
    name: str
    work: Path
    template: Path
    root: Path = field(init=False)
    n: int = 0

    def __post_init__(self) -> None:
        self.root = self.work / self.name / "root"

    # Each contender builds a fresh view of the template on demand.
    def setup(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        pass

    def fresh(self) -> None:
        self.teardown()
        shutil.rmtree(self.work / self.name, ignore_errors=True)
        (self.work / self.name).mkdir(parents=True)
        self.root.mkdir()
        self.setup()


class Native(Contender):
    def setup(self) -> None:
        self.root.rmdir()
        sh(f"cp -a {self.template} {self.root}")


class Overlay(Contender):
    def _dirs(self) -> tuple[Path, Path]:
        upper, wd = self.work / self.name / "upper", self.work / self.name / "wd"
        upper.mkdir(exist_ok=True)
        wd.mkdir(exist_ok=True)
        return upper, wd

    def setup(self) -> None:
        upper, wd = self._dirs()
        sys_mount("overlay", str(self.root), "overlay", 0, f"lowerdir={self.template},upperdir={upper},workdir={wd}")

    def teardown(self) -> None:
        if os.path.ismount(self.root):
            sys_umount(str(self.root))


class FuseOverlay(Overlay):
    def setup(self) -> None:
        upper, wd = self._dirs()
        sh(f"fuse-overlayfs -o lowerdir={self.template},upperdir={upper},workdir={wd},allow_other {self.root}")


class Cowfs(Contender):
    mount_args = ""  # the default: shared files read through the template's page cache

    def setup(self) -> None:
        tree = self.work / self.name / "tree"
        sh(f"{COWFS} clone {self.template} {tree}")
        sh(f"{COWFS} mount {self.mount_args} {tree} {self.root}")

    def teardown(self) -> None:
        if os.path.ismount(self.root):
            sh(f"{COWFS} umount {self.root}")

    def daemon_pss_kib(self) -> int:
        import json

        from cowfs.daemon import STATE_DIR, find_mount

        entry = find_mount(str(self.root))
        assert entry is not None
        pid = json.loads((STATE_DIR / f"{entry.dev}.json").read_text())["pid"]
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
        return 0


class CowfsPrivate(Cowfs):
    mount_args = "--private-cache"  # each mount its own page cache (and writeback caching)


def workloads(big_mib: int) -> list[tuple[str, bool, Callable[[Contender], Callable[[], None]], bool]]:
    """(name, cold, make-the-run, needs a fresh view per run)"""

    def walk(c: Contender) -> Callable[[], None]:
        return lambda: sh("find usr -ls > /dev/null", cwd=c.root)

    def tar(c: Contender) -> Callable[[], None]:
        return lambda: sh("tar cf - usr | cat > /dev/null", cwd=c.root)

    def big_read(c: Contender) -> Callable[[], None]:
        return lambda: sh("dd if=big.img of=/dev/null bs=1M status=none", cwd=c.root)

    def extract(c: Contender) -> Callable[[], None]:
        def run() -> None:
            c.n += 1
            sh(f"mkdir x{c.n} && tar xf {c.work}/usr.tar -C x{c.n}", cwd=c.root)

        return run

    def exec_loop(c: Contender) -> Callable[[], None]:
        return lambda: sh(f"chroot {c.root} /bin/bash -c 'for i in $(seq 200); do /bin/bash -c true; done'")

    def exec_loop_as_user(c: Contender) -> Callable[[], None]:
        # A user who does not own / (a guest's www-data): every path walk
        # checks /'s ACL, which the kernel must be able to cache.
        return lambda: sh(
            f"chroot --userspec=65534:65534 {c.root} /bin/bash -c 'for i in $(seq 200); do /bin/bash -c true; done'"
        )

    def break_100m(c: Contender) -> Callable[[], None]:
        return lambda: sh("echo x >> hundred.img", cwd=c.root)  # a change: overlayfs copies up at the open

    return [
        ("walk+stat usr/ (cold)", True, walk, False),
        ("walk+stat usr/ (warm)", False, walk, False),
        ("tar c usr | cat (cold)", True, tar, False),
        ("tar c usr | cat (warm)", False, tar, False),
        (f"read {big_mib} MiB (cold)", True, big_read, False),
        (f"read {big_mib} MiB (warm)", False, big_read, False),
        ("extract usr.tar", False, extract, False),
        ("chroot + 200 x bash -c true", False, exec_loop, False),
        ("as uid 65534: 200 x bash -c true", False, exec_loop_as_user, False),
        ("break 100 MiB link / copy-up", False, break_100m, True),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--work", default="/var/tmp/cowfs-bench")
    ap.add_argument("--only", help="substring of the workloads to run")
    ap.add_argument("--image-gib", type=int, default=16, help="size of the (sparse) ext4 image the trees live on")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/fs.py: run as root")

    work = Path(args.work)
    for p in [*work.glob("*/root"), work]:  # an interrupted run's
        subprocess.run(["umount", "-l", str(p)], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    with fresh_ext4(Path(f"{work}.img"), work, args.image_gib):
        bench(args, work)


def bench(args: argparse.Namespace, work: Path) -> None:
    template = work / "template"
    print("preparing the template (Debian bookworm minbase + big files) ...", flush=True)
    sh(f"cp -a {minbase('bookworm')} {template}")
    sh(f"head -c {args.big_mib << 20} /dev/urandom > {template}/big.img")
    sh(f"head -c {100 << 20} /dev/urandom > {template}/hundred.img")
    sh(f"tar cf {work}/usr.tar -C {template} usr")
    sh(f"{COWFS} attr set --iunlink -R {template}")

    # clone vs cp -al, alternating
    clone_t: list[float] = []
    cpal_t: list[float] = []
    cpa_t: list[float] = []
    for i in range(args.reps):
        clone_t.append(timed(lambda i=i: sh(f"{COWFS} clone {template} {work}/clone{i}")))
        cpal_t.append(timed(lambda i=i: sh(f"cp -al {template} {work}/cpal{i}")))
        if i < 2:
            cpa_t.append(timed(lambda i=i: sh(f"cp -a {template} {work}/cpa{i}")))
    for i in range(args.reps):
        for d in (f"clone{i}", f"cpal{i}", f"cpa{i}"):
            shutil.rmtree(work / d, ignore_errors=True)

    cs: list[Contender] = [
        Native("ext4", work, template),
        Overlay("overlayfs", work, template),
        FuseOverlay("fuse-overlayfs", work, template),
        Cowfs("cowfs", work, template),
        CowfsPrivate("cowfs-private", work, template),
    ]
    for c in cs:
        c.fresh()
    cow = cs[3]
    assert isinstance(cow, Cowfs)
    idle_pss = cow.daemon_pss_kib()

    results: dict[str, dict[str, list[float]]] = {}
    for name, cold, make, needs_fresh in workloads(args.big_mib):
        if args.only and args.only not in name:
            continue
        results[name] = {c.name: [] for c in cs}
        for rep in range(args.reps):
            order = cs[rep % len(cs) :] + cs[: rep % len(cs)]  # alternate who goes first
            for c in order:
                if needs_fresh:
                    c.fresh()
                run = make(c)
                if cold:
                    drop_caches()
                elif rep == 0 and not needs_fresh:
                    run()  # warm up
                results[name][c.name].append(timed(run))
        print(f"  done: {name}", flush=True)
    for c in cs:
        c.teardown()

    print()
    cows = [c.name for c in cs if isinstance(c, Cowfs)]
    print(
        f"{'workload':34} " + " ".join(f"{c.name:>16}" for c in cs) + "".join(f" {n + '/fuse-ovl':>22}" for n in cows)
    )
    for name, per in results.items():
        med = {k: statistics.median(v) for k, v in per.items()}
        base = med["ext4"]
        cells = " ".join(f"{med[c.name] * 1000:9.1f}ms {med[c.name] / base:4.1f}x" for c in cs)
        ratios = "".join(f" {med[n] / med['fuse-overlayfs']:21.2f}x" for n in cows)
        print(f"{name:34} {cells}{ratios}")
    print()
    mc, ma, mcp = statistics.median(clone_t), statistics.median(cpal_t), statistics.median(cpa_t)
    print(
        f"cowfs clone {mc * 1000:.0f} ms, cp -al {ma * 1000:.0f} ms, cp -a {mcp * 1000:.0f} ms: clone/cp-al = {mc / ma:.2f}x, cp-a/clone = {mcp / mc:.1f}x"
    )
    print(f"cowfs daemon, idle after mount: PSS {idle_pss / 1024:.1f} MiB")
    print(f"(medians of {args.reps} runs on a fresh ext4 (loop device); ratios are to native ext4 unless named)")


if __name__ == "__main__":
    main()
