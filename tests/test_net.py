"""Network contexts: isolated guests on the host's stack, netns, none, host.

Two busybox guests get addresses from 127.0.0.0/8 (the only addresses these
tests send to, besides namespaces they make).  Socket calls that busybox has
no applet for are made by `InGuest`: a forked test process that joins the
guest's cgroups and user namespace and confines itself as every guest
process is confined, so the kernel treats its sockets as the guest's.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import pickle
import secrets
import select
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fails, require, vctx
from pyroute2 import IPRoute

from vctx import netctx
from vctx import sys as k
from vctx.cgroups import GuestCgroups
from vctx.context import confine
from vctx.runtime import running

PINS = Path("/sys/fs/bpf/vctx")


class InGuest:
    """fn(send, *args) run by a process of the guest; send() reports to the test."""

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        r, w = os.pipe()
        st = running(name)
        assert st is not None, f"{name} is not running"
        self.pid = os.fork()
        if self.pid == 0:
            os.close(r)

            def send(obj: Any) -> None:
                data = pickle.dumps(obj)
                os.write(w, struct.pack("<I", len(data)) + data)

            try:
                for node in GuestCgroups(name).nodes():
                    (node / "cgroup.procs").write_text(str(os.getpid()))
                fd = os.pidfd_open(st.init)
                own_net = os.stat(f"/proc/{st.init}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
                k.setns(fd, k.CLONE_NEWUSER | (k.CLONE_NEWNET if own_net else 0))
                os.setresgid(0, 0, 0)
                os.setgroups([])
                os.setresuid(0, 0, 0)
                confine(st.net == "isolated", st.allow_syscalls)
                send(("done", fn(send, *args)))
            except BaseException as e:
                send(("error", f"{type(e).__name__}: {e}"))
            os._exit(0)
        os.close(w)
        self.r = r

    def recv(self, timeout: float = 30) -> Any:
        head = self._read(4, timeout)
        return pickle.loads(self._read(struct.unpack("<I", head)[0], timeout))

    def _read(self, n: int, timeout: float) -> bytes:
        buf = b""
        while len(buf) < n:
            if not select.select([self.r], [], [], timeout)[0]:
                raise TimeoutError("the guest process said nothing")
            chunk = os.read(self.r, n - len(buf))
            if not chunk:
                raise EOFError("the guest process died")
            buf += chunk
        return buf

    def result(self) -> Any:
        kind, value = self.recv()
        os.close(self.r)
        os.waitpid(self.pid, 0)
        if kind == "error":
            raise AssertionError(f"in the guest: {value}")
        return value


def in_guest(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    return InGuest(name, fn, *args).result()


def errno_of(call: Callable[[], Any]) -> int:
    """0 if call() succeeds, else the errno it failed with."""
    try:
        call()
    except OSError as e:
        return e.errno or -1
    return 0


def host_addresses() -> set[str]:
    with IPRoute() as ipr:
        return {str(m.get_attr("IFA_ADDRESS")) for m in ipr.get_addr()}


@pytest.fixture(scope="module")
def net_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require(os.geteuid() == 0, "needs root")
    require(Path("/bin/busybox").is_file(), "needs busybox-static")
    require(
        Path("/sys/fs/cgroup/unified/cgroup.procs").exists() or Path("/sys/fs/cgroup/cgroup.procs").exists(),
        "needs cgroup v2",
    )
    require(k.landlock_abi() >= 6, "needs Landlock ABI 6 (abstract unix socket scoping, Linux 6.12)")
    home = tmp_path_factory.mktemp("net") / "home"
    vctx(home, "template", "build", "bb", "--from", "busybox")
    yield home
    for n in json.loads(vctx(home, "list", "--json").stdout):
        if n["status"] == "running":
            vctx(home, "stop", n["name"], "--timeout", "10", check=False)


@pytest.fixture(scope="module")
def pair(net_home: Path) -> Iterator[dict[str, str]]:
    """Two running isolated guests, a and b, with public addresses in 127/8."""
    tag = secrets.token_hex(2)
    net = 10 + secrets.randbelow(200)
    g = {"a": f"na-{tag}", "b": f"nb-{tag}", "A": f"127.{net}.0.1", "B": f"127.{net}.0.2"}
    for x in ("a", "b"):
        vctx(net_home, "create", g[x], "-t", "bb", "--ip", g[x.upper()])
        vctx(net_home, "boot", g[x])
    yield g
    for x in ("a", "b"):
        vctx(net_home, "stop", g[x], "--timeout", "10", check=False)
        vctx(net_home, "delete", g[x], check=False)


def loopback4(home: Path, name: str) -> str:
    row = json.loads(vctx(home, "status", name, "--json").stdout)
    return str(row["net"]["loopback"][0])


@pytest.fixture(scope="module")
def host_ip() -> Iterator[str]:
    """An address of the host that is no guest's and not loopback: an
    existing one, or one on a dummy interface made for the test."""
    with IPRoute() as ipr:
        for m in ipr.get_addr(family=socket.AF_INET):
            a = ipaddress.ip_address(m.get_attr("IFA_ADDRESS"))
            if not a.is_loopback:
                yield str(a)
                return
        ipr.link("add", ifname="vctxt0", kind="dummy")
        idx = ipr.link_lookup(ifname="vctxt0")[0]
        ipr.addr("add", index=idx, address="198.51.100.1", prefixlen=32)
        yield "198.51.100.1"
        ipr.link("del", index=idx)


# --- isolated ----------------------------------------------------------------------


def test_serve_on_own_address_port_80(net_home: Path, pair: dict[str, str]) -> None:
    """Guest root runs a stock server on port 80 of its address: busybox nc, inside."""
    for x in ("a", "b"):
        p = subprocess.Popen(
            [sys.executable, "-m", "vctx", "exec", pair[x], "--", "sh", "-c", f"echo hello-{x} | nc -l -p 80"],
            env={**os.environ, "VCTX_HOME": str(net_home)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        # nc binds before it accepts; wait for its socket through the guest's own eyes
        def listening(_send: Any, addr: str) -> bool:
            s = socket.socket()
            try:
                return errno_of(lambda: s.bind((addr, 80))) == errno.EADDRINUSE
            finally:
                s.close()

        for _ in range(2000):
            if in_guest(pair[x], listening, pair[x.upper()]):
                break
        with socket.create_connection((pair[x.upper()], 80), timeout=10) as c:
            assert c.recv(100) == f"hello-{x}\n".encode()
        p.wait(timeout=10)


def test_bind_rules(net_home: Path, pair: dict[str, str], host_ip: str) -> None:
    def binds(_send: Any, own: str, other: str, host: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        s = socket.socket()
        out["own_low_port"] = errno_of(lambda: s.bind((own, 81)))
        s.close()
        for key, addr in (("other", other), ("host", host)):
            s = socket.socket()
            out[key] = errno_of(lambda s=s, a=addr: s.bind((a, 0)))  # type: ignore[misc]
            s.close()
        s = socket.socket()
        s.bind(("", 0))
        out["wildcard"] = s.getsockname()[0]
        s.close()
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        out["localhost"] = s.getsockname()[0]
        s.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("0.0.0.0", 0))
        out["udp_wildcard"] = u.getsockname()[0]
        u.close()
        s6 = socket.socket(socket.AF_INET6)
        s6.bind(("::1", 0))
        out["localhost6"] = s6.getsockname()[0]
        s6.close()
        s6 = socket.socket(socket.AF_INET6)
        s6.bind(("::", 0))
        out["wildcard6"] = s6.getsockname()[0]
        s6.close()
        return out

    got = in_guest(pair["a"], binds, pair["A"], pair["B"], host_ip)
    assert got["own_low_port"] == 0  # guest root, port 81, no CAP_NET_BIND_SERVICE on the host
    assert got["other"] == errno.EPERM
    assert got["host"] == errno.EPERM
    assert got["wildcard"] == pair["A"]
    assert got["udp_wildcard"] == pair["A"]
    assert got["localhost"] == "127.0.0.1"  # what the guest sees...
    assert got["localhost6"] == "::1"
    assert got["wildcard6"] == f"::ffff:{pair['A']}"  # no IPv6 address: the primary IPv4 one


def test_loopback_is_private(net_home: Path, pair: dict[str, str]) -> None:
    def serve(send: Any) -> str:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        send(s.getsockname()[1])
        c, peer = s.accept()
        c.sendall(b"private")
        c.close()
        return str(peer[0])

    def connect(_send: Any, port: int) -> Any:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                return c.recv(100), c.getpeername()[0], c.getsockname()[0]
        except OSError as e:
            return e.errno

    server = InGuest(pair["a"], serve)
    port = server.recv()
    # ...and where it really is: the guest's own loopback address, nobody else's 127.0.0.1
    assert errno_of(lambda: socket.create_connection(("127.0.0.1", port), timeout=10).close()) == errno.ECONNREFUSED
    assert in_guest(pair["b"], connect, port) == errno.ECONNREFUSED
    data, peer, local = in_guest(pair["a"], connect, port)
    assert (data, peer, local) == (b"private", "127.0.0.1", "127.0.0.1")
    assert server.result() == "127.0.0.1"
    lo = loopback4(net_home, pair["a"])
    assert lo.startswith("127.255.")

    # and the host's 127.0.0.1 is out of the guests' reach
    with socket.socket() as host_srv:
        host_srv.bind(("127.0.0.1", 0))
        host_srv.listen()
        assert in_guest(pair["a"], connect, host_srv.getsockname()[1]) == errno.ECONNREFUSED


def test_sources_are_the_guests(net_home: Path, pair: dict[str, str]) -> None:
    """TCP and UDP from a guest leave from its address (here to the other
    guest's public address, which stays reachable)."""
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind((pair["B"], 0))
        tcp.listen()
        udp.bind((pair["B"], 0))

        def talk(_send: Any, tport: int, uport: int) -> None:
            with socket.create_connection((pair["B"], tport), timeout=10):
                pass
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b"dgram", (pair["B"], uport))
            u.close()

        in_guest(pair["a"], talk, tcp.getsockname()[1], udp.getsockname()[1])
        conn, peer = tcp.accept()
        conn.close()
        assert peer[0] == pair["A"]
        udp.settimeout(10)
        data, src = udp.recvfrom(100)
        assert (data, src[0]) == (b"dgram", pair["A"])

    def udp_loop(_send: Any) -> Any:
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind(("127.0.0.1", 0))
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        cli.sendto(b"ping", ("127.0.0.1", srv.getsockname()[1]))
        srv.settimeout(10)
        data, src = srv.recvfrom(100)
        return data, src[0]

    assert in_guest(pair["a"], udp_loop) == (b"ping", "127.0.0.1")


def test_forbidden_sockets(pair: dict[str, str]) -> None:
    name = f"\0vctx-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX) as host_abstract:
        host_abstract.bind(name)
        host_abstract.listen()

        def tries(_send: Any) -> dict[str, int]:
            return {
                "raw": errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                "raw6": errno_of(lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)),
                "packet": errno_of(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
                "sock_diag": errno_of(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)),
                "abstract": errno_of(lambda: socket.socket(socket.AF_UNIX).connect(name)),
                "route_ok": errno_of(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()),
            }

        got = in_guest(pair["a"], tries)
    assert got["raw"] == errno.EPERM and got["raw6"] == errno.EPERM and got["packet"] == errno.EPERM
    assert got["sock_diag"] == errno.EACCES  # `ss` cannot list the host's sockets
    assert got["abstract"] == errno.EPERM  # the host's abstract unix sockets are out of reach
    assert got["route_ok"] == 0  # other netlink families still work


def test_cannot_change_host_network(net_home: Path, pair: dict[str, str]) -> None:
    for cmd in (["ip", "link", "set", "lo", "mtu", "1000"], ["ip", "addr", "add", "127.99.0.9/32", "dev", "lo"]):
        res = vctx(net_home, "exec", pair["a"], "--", *cmd, check=False)
        assert res.returncode != 0 and "not permitted" in res.stderr
    assert "127.99.0.9" not in host_addresses()
    # the init and an exec'd process both carry the seccomp filter
    out = vctx(net_home, "exec", pair["a"], "--", "sh", "-c", "grep Seccomp: /proc/1/status /proc/self/status").stdout
    assert out.count("\t2") == 2


def test_live_address_change(net_home: Path, pair: dict[str, str]) -> None:
    a, new = pair["a"], pair["A"].rsplit(".", 1)[0] + ".3"
    out = vctx(net_home, "set", a, f"ip={new}").stdout
    assert "applied to the running guest" in out
    try:
        assert new in host_addresses() and pair["A"] not in host_addresses()

        def binds(_send: Any, addr: str) -> str:
            s = socket.socket()
            try:
                s.bind((addr, 0))
                return str(s.getsockname()[0])
            finally:
                s.close()

        assert in_guest(a, binds, "0.0.0.0") == new  # the wildcard follows the primary address
        assert in_guest(a, binds, new) == new
        # the old address is nobody's now: a 127/8 bind to it lands on the guest's loopback
        assert in_guest(a, binds, pair["A"]) == "127.0.0.1"
    finally:
        vctx(net_home, "set", a, f"ip={pair['A']}")
    assert pair["A"] in host_addresses() and new not in host_addresses()


def test_bad_input_changes_nothing(net_home: Path, pair: dict[str, str], host_ip: str) -> None:
    cfg = (net_home / "guests" / pair["a"] / "guest.toml").read_text()
    assert pair["b"] in fails(net_home, 23, "set", pair["a"], f"ip={pair['B']}")
    fails(net_home, 23, "set", pair["a"], f"ip={host_ip}")
    fails(net_home, 25, "set", pair["a"], "ip=300.1.2.3")
    fails(net_home, 25, "set", pair["a"], "ip=127.0.0.1")
    fails(net_home, 21, "set", pair["a"], "interface=nosuch0")
    fails(net_home, 25, "create", "nx", "-t", "bb", "--ip", "not-an-address")
    fails(net_home, 23, "create", "nx", "-t", "bb", "--ip", pair["B"])
    assert (net_home / "guests" / pair["a"] / "guest.toml").read_text() == cfg
    assert not (net_home / "guests" / "nx").exists()
    assert pair["A"] in host_addresses()


def test_stop_removes_addresses_and_programs(net_home: Path) -> None:
    name, ip = f"nc-{secrets.token_hex(2)}", f"127.{10 + secrets.randbelow(200)}.1.1"
    vctx(net_home, "create", name, "-t", "bb", "--ip", ip)
    vctx(net_home, "boot", name)
    cg = GuestCgroups(name).v2
    assert cg is not None
    assert len(netctx.attached(cg)) == 13
    lo6 = json.loads(vctx(net_home, "status", name, "--json").stdout)["net"]["loopback"][1]
    assert ip in host_addresses() and lo6 in host_addresses() and (PINS / name).is_dir()
    vctx(net_home, "stop", name)
    assert ip not in host_addresses() and lo6 not in host_addresses()
    assert not (PINS / name).exists() and not cg.exists()
    vctx(net_home, "delete", name)


# --- netns, none, host ------------------------------------------------------------------


def test_netns_mode(net_home: Path, pair: dict[str, str]) -> None:
    name, ip = f"nn-{secrets.token_hex(2)}", f"169.254.{1 + secrets.randbelow(250)}.2"
    vctx(net_home, "create", name, "-t", "bb", "--network", "netns", "--ip", ip)
    vctx(net_home, "boot", name)
    try:
        host_if = json.loads(vctx(net_home, "status", name, "--json").stdout)["net"]["host_interface"]
        inside = vctx(net_home, "exec", name, "--", "ip", "-o", "addr").stdout
        assert f"eth0    inet {ip}/32" in inside.replace("\\", "")  # configured before init ran
        with socket.socket() as srv:
            srv.bind((str(netctx.GATEWAY4.ip), 0))  # the host, as the guest's gateway
            srv.listen()
            port = srv.getsockname()[1]
            nc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vctx",
                    "exec",
                    name,
                    "--",
                    "sh",
                    "-c",
                    f"echo via-veth | nc {netctx.GATEWAY4.ip} {port}",
                ],
                env={**os.environ, "VCTX_HOME": str(net_home)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            conn, peer = srv.accept()
            assert peer[0] == ip and conn.recv(100) == b"via-veth\n"
            conn.close()  # nc ends when its peer does
            assert nc.wait(timeout=30) == 0
        # the isolated guest's address is not reachable from the netns guest's own 127/8
        res = vctx(net_home, "exec", name, "--", "sh", "-c", f"nc {pair['A']} 80 </dev/null", check=False)
        assert res.returncode != 0
        assert f"{ip}/32" not in vctx(net_home, "exec", pair["a"], "--", "ip", "-o", "addr").stdout
    finally:
        vctx(net_home, "stop", name)
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=host_if)  # the pair and its routes are gone
    vctx(net_home, "delete", name)


def test_netns_guest_cannot_spoof_sources(net_home: Path) -> None:
    """A routed netns guest's packets reach the host only from its own
    addresses: rp_filter for IPv4, the tc source guard for IPv6."""
    v6 = netctx.ipv6_enabled()
    name = f"ns-{secrets.token_hex(2)}"
    net4 = f"169.254.{1 + secrets.randbelow(250)}"
    net6 = f"fd{secrets.token_hex(1)}:{secrets.token_hex(2)}:{secrets.token_hex(2)}:"
    # in the kernel's own spelling ("056e" is "56e"), as recvfrom reports them
    mine = [f"{net4}.2", *([str(ipaddress.ip_address(f"{net6}:2"))] if v6 else [])]
    spoofed = [f"{net4}.9", *([str(ipaddress.ip_address(f"{net6}:9"))] if v6 else [])]
    vctx(net_home, "create", name, "-t", "bb", "--network", "netns", *(x for a in mine for x in ("--ip", a)))
    vctx(net_home, "boot", name)
    servers: list[socket.socket] = []
    try:
        host_if = json.loads(vctx(net_home, "status", name, "--json").stdout)["net"]["host_interface"]
        init = running(name)
        assert init is not None
        scope = socket.if_nametoindex(host_if)
        for family, gw in ((socket.AF_INET, str(netctx.GATEWAY4.ip)), (socket.AF_INET6, str(netctx.GATEWAY6.ip))):
            if family == socket.AF_INET6 and not v6:
                continue
            srv = socket.socket(family, socket.SOCK_DGRAM)
            srv.bind((gw, 0) if family == socket.AF_INET else (gw, 0, 0, scope))
            servers.append(srv)
        # In the guest's network namespace: the spoofed addresses added (as
        # guest root may), then one datagram from each address, spoofed first.
        script = f"""
import socket
from pyroute2 import IPRoute
with IPRoute() as ipr:
    i = ipr.link_lookup(ifname="eth0")[0]
    for a in {spoofed!r}:
        ipr.addr("add", index=i, address=a, prefixlen=32 if "." in a else 128, flags=0x02)  # IFA_F_NODAD
for srv, port in {[s.getsockname()[:2] for s in servers]!r}:
    fam = socket.AF_INET if "." in srv else socket.AF_INET6
    for src in [a for a in {spoofed + mine!r} if ("." in a) == (fam == socket.AF_INET)]:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((src, 0))
        dst = (srv, port) if fam == socket.AF_INET else (srv, port, 0, socket.if_nametoindex("eth0"))
        s.sendto(src.encode(), dst)
"""
        subprocess.run(["nsenter", "-t", str(init.init), "-n", sys.executable, "-c", script], check=True)
        for srv in servers:
            # the spoofed datagram was sent first, on the same path: had it
            # passed, it would be here before the real one
            data, peer = srv.recvfrom(100)
            assert data.decode() == peer[0] and peer[0] in mine
            srv.setblocking(False)
            with pytest.raises(BlockingIOError):
                srv.recvfrom(100)
    finally:
        for srv in servers:
            srv.close()
        vctx(net_home, "stop", name)
    vctx(net_home, "delete", name)


def test_netns_on_a_bridge(net_home: Path) -> None:
    """network = "netns" with bridge = BR: the host end is enslaved to the
    bridge, the guest reaches its gateway over it; nothing is left after."""
    br, name = f"vctxtb{secrets.token_hex(2)}", f"nbr-{secrets.token_hex(2)}"
    net = f"169.254.{1 + secrets.randbelow(250)}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=br, kind="bridge")
        bidx = ipr.link_lookup(ifname=br)[0]
        ipr.addr("add", index=bidx, address=f"{net}.1", prefixlen=24)
        ipr.link("set", index=bidx, state="up")
    try:
        vctx(net_home, "create", name, "-t", "bb", "--network", "netns", "--ip", f"{net}.2/24")
        fails(net_home, 21, "set", name, f"bridge={br}x")  # no such bridge: refused, nothing changed
        vctx(net_home, "set", name, f"bridge={br}", f"gateway={net}.1")
        vctx(net_home, "boot", name)
        try:
            st = json.loads(vctx(net_home, "status", name, "--json").stdout)["net"]
            with IPRoute() as ipr:
                host_end = ipr.link("get", index=ipr.link_lookup(ifname=st["host_interface"])[0])[0]
                assert host_end.get_attr("IFLA_MASTER") == bidx
            assert f"default via {net}.1 dev eth0" in vctx(net_home, "exec", name, "--", "ip", "route").stdout
            with socket.socket() as srv:
                srv.bind((f"{net}.1", 0))
                srv.listen()
                port = srv.getsockname()[1]
                nc = subprocess.Popen(
                    [sys.executable, "-m", "vctx", "exec", name, "--", "sh", "-c", f"echo bridged | nc {net}.1 {port}"],
                    env={**os.environ, "VCTX_HOME": str(net_home)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                conn, peer = srv.accept()
                assert peer[0] == f"{net}.2" and conn.recv(100) == b"bridged\n"
                conn.close()
                assert nc.wait(timeout=30) == 0
        finally:
            vctx(net_home, "stop", name)
        with IPRoute() as ipr:
            assert not ipr.link_lookup(ifname=st["host_interface"])
            assert ipr.link_lookup(ifname=br)  # the bridge is the admin's: it stays
        vctx(net_home, "delete", name)
    finally:
        with IPRoute() as ipr:
            ipr.link("del", ifname=br)


def test_none_and_host_modes(net_home: Path) -> None:
    none, host = f"no-{secrets.token_hex(2)}", f"ho-{secrets.token_hex(2)}"
    vctx(net_home, "create", none, "-t", "bb", "--network", "none")
    vctx(net_home, "create", host, "-t", "bb", "--network", "host")
    vctx(net_home, "boot", none)
    try:
        links = vctx(net_home, "exec", none, "--", "ip", "-o", "link").stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        line = next(x for x in vctx(net_home, "list").stdout.splitlines() if host in x.split())
        assert "(!host)" in line  # the unconfined one is flagged
    finally:
        vctx(net_home, "stop", none)
    for n in (none, host):
        vctx(net_home, "delete", n)


def test_no_cgroup_bpf_is_one_clear_error(net_home: Path) -> None:
    """A host without a cgroup v2 hierarchy cannot confine an isolated guest: refused before anything is added."""
    from vctx import errors
    from vctx.config import GuestConfig, Net

    cfg = GuestConfig(name="nobpf", template="bb", init="busybox", id_base=200 * 65536, net=Net(ip=["127.201.0.1"]))
    cfg.check()
    with pytest.raises(errors.HostLacks, match="cgroup v2"):
        netctx.up_isolated(netctx.plan(cfg), None)
    assert "127.201.0.1" not in host_addresses()
    assert not netctx.Record.path("nobpf").exists()


def test_programs_load_though_signals_interrupt_the_verifier() -> None:
    """The verifier gives up (EAGAIN) when a signal is pending, and vctxd
    takes SIGCHLD whenever a process it started exits: every program loads
    anyway, and a program the verifier refuses still says why."""
    import signal

    from vctx import bpf, netprog

    require(os.geteuid() == 0, "needs root")
    maps = [
        bpf.Map.create(bpf.MAP_ARRAY, 4, netprog.CONF_SIZE, 1, "t_conf"),
        bpf.Map.create(bpf.MAP_HASH, netprog.KEY_SIZE, 4, 16, "t_addrs"),
        bpf.Map.create(bpf.MAP_HASH, netprog.KEY_SIZE, 4, 16, "t_public"),
    ]
    fired = 0

    def tick(_sig: int, _frame: object) -> None:
        nonlocal fired
        fired += 1

    old = signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)  # a program takes 0.1-0.4 ms
    loaded = 0
    try:
        for _ in range(30):
            for prog in netprog.programs(maps[0].fd, maps[1].fd, maps[2].fd):
                os.close(bpf.load_program(prog.prog_type, prog.attach_type, prog.asm.assemble(), prog.name))
                loaded += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for m in maps:
            m.close()
    assert fired > 0 and loaded > 0
    exit_only = bytes([0x95]) + bytes(7)  # BPF_EXIT with r0 never set
    with pytest.raises(OSError, match=r"the kernel refused BPF program t_bad: .*R0 !read_ok"):
        bpf.load_program(bpf.PROG_CGROUP_SOCK_ADDR, netprog.INET4_BIND, exit_only, "t_bad")
