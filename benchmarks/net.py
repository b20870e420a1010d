"""Network paths against their peers, in one run, contenders alternating.

For each path, iperf3 single-stream TCP throughput and sockperf's 64-byte
TCP ping-pong latency (median), the server inside, the client on the host:

- host loopback: both ends on the host (127.0.0.1), the floor;
- isolated, BPF only: the server on the host, in the isolated guest's
  cgroup v2 node alone: the network context's programs and nothing else;
- vctx isolated: the server in an isolated guest on its own 127/8 address
  (the host's stack; cgroup BPF acts at bind/connect only), with the rest
  of the context (its cgroups, namespaces, seccomp);
- vctx netns: the server in a netns guest, through its routed veth pair;
- nspawn veth: the server in systemd-nspawn --network-veth, the peer.

Targets: isolated >= 0.97x host throughput and <= 1.05x host latency;
netns at least as fast as nspawn's veth.

Needs iperf3 and sockperf on the host (tools/setup installs them) and builds
a Debian template with both (debootstrap; the .debs are cached).
Run as root: sudo .venv/bin/python benchmarks/net.py [--rounds N] [--seconds S]
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
from collections.abc import Callable
from pathlib import Path

VCTX = str(Path(sys.executable).parent / "vctx")
DEBS = Path("/var/cache/vctx/debs")
ISO_IP, NETNS_IP = "127.77.0.1", "169.254.77.2"
NSPAWN_HOST, NSPAWN_GUEST = "169.254.78.1", "169.254.78.2"
Runner = Callable[[list[str]], list[str]]  # server argv -> the argv that runs it in the contender


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), text=True, capture_output=True)
    if check and res.returncode != 0:
        sys.exit(f"benchmarks/net.py: {' '.join(cmd[:5])} failed: {res.stderr.strip()[-300:]}")
    return res


def serve(argv: list[str], ready: str) -> subprocess.Popen[str]:
    """Start a server and return once it printed its ready line."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    for line in p.stdout:
        if ready in line:
            return p
    sys.exit(f"benchmarks/net.py: {' '.join(argv[:6])} never got ready")


def throughput(runner: Runner, addr: str, seconds: int) -> float:
    """iperf3, one stream, client on the host: Gbit/s received."""
    srv = serve(runner(["iperf3", "-s", "-1", "--forceflush", "-B", addr, "-p", "5201"]), "Server listening")
    try:
        out = run("iperf3", "-c", addr, "-p", "5201", "-t", str(seconds), "-J").stdout
    finally:
        srv.wait(timeout=30)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def latency(runner: Runner, addr: str, seconds: int) -> float:
    """sockperf ping-pong, 64-byte messages over TCP: median round trip, microseconds."""
    srv = serve(
        runner(["stdbuf", "-oL", "-eL", "sockperf", "sr", "--tcp", "-i", addr, "-p", "11111"]), "block on socket"
    )
    try:
        out = run("sockperf", "pp", "--tcp", "-i", addr, "-p", "11111", "-m", "64", "-t", str(seconds)).stdout
    finally:
        run("pkill", "-f", "sockperf sr", check=False)  # wherever it runs: the host sees every process
        srv.wait(timeout=30)
    for line in out.splitlines():
        if "percentile 50.000" in line:
            return float(line.split("=")[-1])
    sys.exit(f"benchmarks/net.py: no median in sockperf's output:\n{out[-500:]}")


def nspawn_start(tree: Path) -> tuple[subprocess.Popen[str], int]:
    """A container with --network-veth, its two ends given addresses."""
    p = subprocess.Popen(
        [
            "systemd-nspawn",
            "-q",
            "-D",
            str(tree),
            "--network-veth",
            "--register=no",
            "--keep-unit",
            "sleep",
            "infinity",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # the leader appears once nspawn has set up the namespaces
    leader = 0
    while not leader:
        if p.poll() is not None:
            sys.exit("benchmarks/net.py: systemd-nspawn exited")
        kids = run("pgrep", "-P", str(p.pid), check=False).stdout.split()
        if kids and Path(f"/proc/{kids[0]}/ns/net").stat().st_ino != Path("/proc/self/ns/net").stat().st_ino:
            comm = Path(f"/proc/{kids[0]}/comm").read_text().strip()
            leader = int(kids[0]) if comm == "sleep" else 0
    from pyroute2 import IPRoute, NetNS  # the benchmark may use what vctx depends on

    with IPRoute() as ipr:
        host_if = next(
            str(link.get_attr("IFLA_IFNAME"))
            for link in ipr.get_links()
            if str(link.get_attr("IFLA_IFNAME")).startswith("ve-")
        )
        idx = ipr.link_lookup(ifname=host_if)[0]
        ipr.addr("add", index=idx, address=NSPAWN_HOST, prefixlen=30)
        ipr.link("set", index=idx, state="up")
    netns = f"/proc/{leader}/ns/net"
    with NetNS(netns) as ns:
        idx = ns.link_lookup(ifname="host0")[0]
        ns.addr("add", index=idx, address=NSPAWN_GUEST, prefixlen=30)
        ns.link("set", index=idx, state="up")
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    return p, leader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3, help="per measurement")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/net.py: run as root")
    for tool in ("iperf3", "sockperf"):
        if shutil.which(tool) is None:
            sys.exit(f"benchmarks/net.py: needs {tool} (apt install {tool}, or tools/setup)")
    home = Path(tempfile.mkdtemp(prefix="vctx-net-", dir="/var/tmp"))
    os.environ["VCTX_HOME"] = str(home)
    nspawn: subprocess.Popen[str] | None = None
    try:
        print("building a Debian template with iperf3 and sockperf ...", flush=True)
        run(
            VCTX,
            "template",
            "build",
            "net",
            "--from",
            "debian",
            "--include",
            "iperf3,sockperf",
            "--cache-dir",
            str(DEBS),
        )
        run(VCTX, "create", "iso", "-t", "net", "--ip", ISO_IP)
        run(VCTX, "create", "nns", "-t", "net", "--network", "netns", "--ip", NETNS_IP)
        for g in ("iso", "nns"):
            run(VCTX, "set", g, "init=plain", "command=/bin/sleep infinity")
            run(VCTX, "boot", g)

        def in_guest(g: str) -> Runner:
            return lambda argv: [VCTX, "exec", g, "--", *argv]

        from vctx.cgroups import GuestCgroups

        v2 = GuestCgroups("iso").v2

        def bpf_only(argv: list[str]) -> list[str]:
            """A host process in the guest's cgroup v2 node alone: its BPF programs, no other controller."""
            return ["sh", "-c", f'echo $$ > {v2}/vctx-bpf/cgroup.procs && exec "$@"', "sh", *argv]

        assert v2 is not None
        (v2 / "vctx-bpf").mkdir(exist_ok=True)
        contenders: dict[str, tuple[Runner, str]] = {
            "host loopback": (lambda argv: argv, "127.0.0.1"),
            "isolated, BPF only": (bpf_only, ISO_IP),
            "vctx isolated": (in_guest("iso"), ISO_IP),
            "vctx netns": (in_guest("nns"), NETNS_IP),
        }
        if shutil.which("systemd-nspawn"):
            plain = home / "plain"
            run("cp", "-a", str(home / "templates/net/rootfs"), str(plain))
            nspawn, leader = nspawn_start(plain)
            contenders["nspawn veth"] = (lambda argv: ["nsenter", "-a", "-t", str(leader), *argv], NSPAWN_GUEST)
        else:
            print("systemd-nspawn missing: its row is skipped (apt install systemd-container)")

        tput: dict[str, list[float]] = {k: [] for k in contenders}
        lat: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            order = list(contenders.items())
            if r % 2:
                order.reverse()  # alternate: no contender always runs first
            for name, (runner, addr) in order:
                tput[name].append(throughput(runner, addr, args.seconds))
                lat[name].append(latency(runner, addr, args.seconds))
            print(f"  round {r + 1}/{args.rounds} done", flush=True)

        host_t, host_l = statistics.median(tput["host loopback"]), statistics.median(lat["host loopback"])
        print(f"\n## single-stream TCP (iperf3) and 64-byte TCP ping-pong (sockperf), {args.rounds} rounds, medians")
        print(f"  {'path':<20} {'Gbit/s':>8} {'x host':>7} {'latency us':>11} {'x host':>7}")
        for name in contenders:
            t, lt = statistics.median(tput[name]), statistics.median(lat[name])
            print(f"  {name:<20} {t:8.2f} {t / host_t:7.3f} {lt:11.2f} {lt / host_l:7.3f}")
        bpf_t = statistics.median(tput["isolated, BPF only"]) / host_t
        print(f"\n  the network context alone (BPF only) / host throughput = {bpf_t:.3f}")
        iso_t = statistics.median(tput["vctx isolated"]) / host_t
        iso_l = statistics.median(lat["vctx isolated"]) / host_l
        print(f"  isolated / host throughput = {iso_t:.3f} (target >= 0.97) {'met' if iso_t >= 0.97 else 'NOT met'}")
        print(f"  isolated / host latency    = {iso_l:.3f} (target <= 1.05) {'met' if iso_l <= 1.05 else 'NOT met'}")
        if "nspawn veth" in contenders:
            nt = statistics.median(tput["vctx netns"]) / statistics.median(tput["nspawn veth"])
            nl = statistics.median(lat["vctx netns"]) / statistics.median(lat["nspawn veth"])
            ok = nt >= 0.97 and nl <= 1.05
            print(f"  netns / nspawn veth: throughput {nt:.3f}, latency {nl:.3f} {'met' if ok else 'NOT met'}")
    finally:
        if nspawn is not None:
            nspawn.terminate()
            nspawn.wait()
        for g in ("iso", "nns"):
            subprocess.run([VCTX, "stop", g, "--timeout", "2"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
