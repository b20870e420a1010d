"""Templates, clones and unify against their peers, in one run.

1. Cloning a debootstrapped Debian bookworm minbase: `cowfs clone` against
   `cp -al` and `cp -a`, alternating, medians and ratios.
2. Ten guests cloned from the template: disk used by the set against one
   guest alone.
3. Drift: each guest installs a different mix of packages (dpkg -i in a
   chroot on the guest's cowfs mount), so the guests hold equal files that
   are no longer shared.  Then the same ten trees (copied with their links)
   are deduplicated by `cowfs unify`, util-linux `hardlink`, `rdfind
   -makehardlinks true` and `jdupes -L -r`: wall time and disk after.
4. unify's hashing rate against raw BLAKE3 over the same bytes.

Run as root: sudo .venv/bin/python benchmarks/disk.py [--reps N]
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
from collections.abc import Callable
from pathlib import Path

import blake3

from cowfs.du import du
from cowfs.progress import human
from vctx.debian import CACHE, minbase

BIN = Path(sys.executable).parent
# Package sets the guests draw from; guest i installs sets i, i+2 and i+3 (mod 7),
# so every set lands in several guests — equal files, separately installed.
SETS = [
    ["less"],
    ["nano", "libncursesw6"],
    ["file", "libmagic1", "libmagic-mgc"],
    ["xz-utils"],
    ["vim-tiny", "vim-common"],
    ["bc", "libreadline8", "readline-common"],
    ["python3.11-minimal", "libpython3.11-minimal", "libexpat1", "libssl3"],
]


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    res: subprocess.CompletedProcess[str] = subprocess.run(list(cmd), text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        sys.exit(f"benchmarks/disk.py: {' '.join(cmd[:3])}... failed: {res.stderr.strip()[-300:]}")
    return res


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def debs(cache: Path) -> dict[str, Path]:
    """The .debs of every set, downloaded once with the host's apt."""
    cache.mkdir(parents=True, exist_ok=True)
    want = sorted({p for s in SETS for p in s})
    missing = [p for p in want if not list(cache.glob(f"{p}_*.deb"))]
    if missing:
        run("apt-get", "download", *missing, cwd=cache)
    return {p: next(cache.glob(f"{p}_*.deb")) for p in want}


def bench_clone(template: Path, work: Path, reps: int) -> None:
    print(f"\n## cloning a Debian minbase template ({reps} rounds, alternating)")
    cmds: dict[str, Callable[[Path], object]] = {
        "cowfs clone": lambda d: run(str(BIN / "cowfs"), "clone", str(template), str(d)),
        "clone -j 1": lambda d: run(str(BIN / "cowfs"), "clone", "-j", "1", str(template), str(d)),
        "cp -al": lambda d: run("cp", "-al", str(template), str(d)),
        "cp -a": lambda d: run("cp", "-a", str(template), str(d)),
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    made: list[Path] = []
    for r in range(reps):
        for name, fn in cmds.items():
            d = work / f"clone-{r}-{name.replace(' ', '_')}"
            os.sync()
            times[name].append(timed(lambda fn=fn, d=d: fn(d)))  # type: ignore[misc]
            made.append(d)
    # Removed only now: on ext4 without a journal (as here), inodes freed in
    # the last seconds are skipped one by one by the inode allocator, so a
    # tree removed between rounds would slow whoever comes next.
    for d in made:
        shutil.rmtree(d)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:<12} {v * 1000:8.1f} ms")
    print(f"  cowfs clone / cp -al = {med['cowfs clone'] / med['cp -al']:.2f}  (target <= 1.5)")
    print(f"  clone -j 1 / cp -al  = {med['clone -j 1'] / med['cp -al']:.2f}  (one process)")
    print(f"  cp -a / cowfs clone  = {med['cp -a'] / med['cowfs clone']:.1f}  (target >= 20)")
    print(f"  cp -a / cp -al       = {med['cp -a'] / med['cp -al']:.1f}  (what linking alone gains)")


def make_guests(template: Path, work: Path, n: int) -> list[Path]:
    guests = []
    for i in range(n):
        g = work / "set" / f"g{i}"
        run(str(BIN / "cowfs"), "clone", str(template), str(g))
        guests.append(g)
    return guests


def drift(guests: list[Path], pkgs: dict[str, Path], work: Path) -> None:
    """Install each guest's package mix through its cowfs mount."""
    for i, g in enumerate(guests):
        mnt = work / f"mnt{i}"
        mnt.mkdir(exist_ok=True)
        run(str(BIN / "cowfs"), "mount", "--dev", str(g), str(mnt))
        try:
            mine = [pkgs[p] for k in (i, i + 2, i + 3) for p in SETS[k % len(SETS)]]
            for d in mine:
                shutil.copy(d, mnt / "tmp")
            run("chroot", str(mnt), "dpkg", "-i", *(f"/tmp/{d.name}" for d in mine))
            for d in mine:
                (mnt / "tmp" / d.name).unlink()
        finally:
            run(str(BIN / "cowfs"), "umount", str(mnt))


def disk_of(paths: list[Path]) -> int:
    return du([str(p) for p in paths]).on_disk


def bench_dedupe(template: Path, guests: list[Path], work: Path, fresh_disk: int, reps: int) -> None:
    base = work / "set"
    one = disk_of([guests[0]])
    print(f"\n## ten guests, then drift, then deduplication (medians of {reps} rounds, alternating)")
    print(f"  one guest alone (full copy):      {human(one)}")
    print(
        f"  ten fresh clones + template:      {human(fresh_disk)}  = {fresh_disk / one:.2f}x one guest (target <= 1.1)"
    )
    drifted = disk_of([template, *guests])
    print(f"  after drift:                      {human(drifted)}")
    tools: dict[str, Callable[[list[str]], list[str]]] = {
        "cowfs unify": lambda ts: [str(BIN / "cowfs"), "unify", "--json", *ts],
        "cowfs unify --no-default-excludes": lambda ts: [
            str(BIN / "cowfs"),
            "unify",
            "--json",
            "--no-default-excludes",
            "--min-size",
            "1",
            *ts,
        ],
        "hardlink": lambda ts: ["hardlink", "-q", *ts],
        "rdfind": lambda ts: ["rdfind", "-makehardlinks", "true", "-outputname", "/dev/null", *ts],
        "jdupes": lambda ts: ["jdupes", "-q", "-L", "-r", *ts],
    }
    secs_of: dict[str, list[float]] = {name: [] for name in tools}
    disk_after: dict[str, int] = {}
    unify_json: dict[str, object] = {}
    for r in range(reps):  # alternating, a fresh copy of the drifted set each time
        for name, cmd in tools.items():
            if shutil.which(cmd([])[0]) is None:
                if r == 0:
                    print(f"  {name}: not installed, skipped")
                continue
            copy = work / f"dedupe-{r}-{list(tools).index(name)}"
            run("cp", "-a", str(base), str(copy))  # one cp: links between template and trees are kept
            ts = [copy / g.name for g in guests]
            os.sync()
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
            # warm the metadata the same way for everyone: one walk
            for t in ts:
                run("find", str(t), "-xdev", "-printf", "")
            t0 = time.perf_counter()
            res = subprocess.run(cmd([str(t) for t in ts]), capture_output=True, text=True, check=False)
            secs = time.perf_counter() - t0
            if res.returncode != 0:
                print(f"  {name}: failed: {res.stderr.strip()[-200:]}")
                continue
            if name == "cowfs unify":
                unify_json = json.loads(res.stdout)
            # unify's store sits beside the trees
            store = [p for p in [copy / ".cowfs-store"] if p.exists()]
            secs_of[name].append(secs)
            disk_after[name] = disk_of([copy / template.name, *ts, *store])
            shutil.rmtree(copy)
            os.sync()  # the removal's discards done before the next copy
    results = {k: (statistics.median(v), disk_after[k]) for k, v in secs_of.items() if v}
    print(f"  {'tool':<36} {'seconds':>8} {'disk after':>12} {'saved':>10}  every round")
    for name, (secs, d) in results.items():
        every = " ".join(f"{x:.2f}" for x in secs_of[name])
        print(f"  {name:<36} {secs:8.2f} {human(d):>12} {human(drifted - d):>10}  {every}")
    peers = [results[k][0] for k in ("hardlink", "rdfind", "jdupes") if k in results]
    if "cowfs unify" in results and peers:
        print(f"  unify wall time / fastest peer = {results['cowfs unify'][0] / min(peers):.2f}  (target < 1)")
    # Hashing rate with the data in the page cache: dry runs over the drifted
    # trees, the first to read them in, then the median of five (this host
    # pages out what was not touched for a few seconds: a run can find some
    # of the cache gone).
    runs = []
    for _ in range(6):
        out = run(str(BIN / "cowfs"), "unify", "--dry-run", "--json", *(str(g) for g in guests))
        runs.append(json.loads(out.stdout))
    warm: dict[str, object] = sorted(runs[1:], key=lambda js: float(js["hash_seconds"]))[2]  # type: ignore[arg-type]
    for label, js in (("cold cache", unify_json), ("warm cache", warm)):
        if not js:
            continue
        hashed = int(js["hashed_bytes"])  # type: ignore[call-overload]
        rate = hashed / float(js["hash_seconds"])  # type: ignore[arg-type]
        raw, raw_bytes = raw_blake3(guests)
        print(
            f"\n## hashing ({label}): unify {human(rate)}/s over {human(hashed)};"
            f" BLAKE3 alone {human(raw)}/s over the same {human(raw_bytes)} in memory"
        )
        print(f"  unify / raw = {rate / raw:.2f}  (target >= 0.7)")


def raw_blake3(trees: list[Path]) -> tuple[float, int]:
    """BLAKE3 alone over the very files unify hashes, held in memory: the
    better of one thread and a pool of one per CPU (bytes/s, bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    from cowfs.unify import UnifyOptions, hashed_paths

    datas = [Path(p).read_bytes() for p in hashed_paths([str(t) for t in trees], UnifyOptions())]
    got = sum(map(len, datas))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for b in datas:
            blake3.blake3(b).digest()
        best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(lambda b: blake3.blake3(b).digest(), datas, chunksize=64))
        best = min(best, time.perf_counter() - t0)
    return got / best, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--guests", type=int, default=10)
    ap.add_argument("--dedupe-reps", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/disk.py: run as root")
    src = minbase()
    pkgs = debs(CACHE / "drift-debs")
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vctx-disk-") as w:
        work = Path(w)
        (work / "set").mkdir()
        template = work / "set" / "template"
        run("cp", "-a", str(src), str(template))
        run(str(BIN / "cowfs"), "attr", "set", "--iunlink", "-R", str(template))
        bench_clone(template, work, args.reps)
        guests = make_guests(template, work, args.guests)
        fresh_disk = disk_of([template, *guests])
        t0 = time.perf_counter()
        drift(guests, pkgs, work)
        print(
            f"\n(drift: {len(guests)} guests installed their packages through cowfs in {time.perf_counter() - t0:.1f}s)"
        )
        bench_dedupe(template, guests, work, fresh_disk, args.dedupe_reps)


if __name__ == "__main__":
    main()
