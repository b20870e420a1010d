"""A running guest's one host-side process: its cowfs daemon and init's parent.

`vctx boot` starts `python -m vctx.monitor NAME`, detached from the caller.
The monitor:

1. forks the launcher while it is still single-threaded, makes the guest's
   cgroups and puts the launcher in them, mounts the guest's tree with cowfs
   (ids shifted into the guest's range);
2. lets the launcher unshare its namespaces, writes its uid/gid maps, and
   the launcher forks the guest's PID 1, which builds the root (context.py)
   and execs init;
3. serves the FUSE mount and waits for init in one trio loop, draining the
   console into console.log;
4. when init dies, waits for the context to empty, unmounts, removes the
   cgroups — and on a guest's reboot (init killed by SIGHUP: reboot(2) in a
   PID namespace) execs itself to boot the guest again.

It is a subreaper, so PID 1 becomes its child once the launcher exits, and
it alone reads init's wait status.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cowfs.daemon import MountOptions, Served
from cowfs.idmap import IdMap

from . import errors, netctx
from . import guest as guests
from . import sys as k
from .cgroups import GuestCgroups
from .config import RLIMITS
from .context import Spec, become_init, setup_root
from .files import write_atomic
from .home import Home

RUN = Path(os.environ.get("VCTX_RUN", "/run/vctx"))
NS_FLAGS = k.CLONE_NEWUSER | k.CLONE_NEWNS | k.CLONE_NEWUTS | k.CLONE_NEWIPC | k.CLONE_NEWPID | k.CLONE_NEWCGROUP
CONSOLE_LOG_MAX = 1 << 20
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
log = logging.getLogger("vctx.monitor")


def run_dir(name: str) -> Path:
    return RUN / name


def state_path(name: str) -> Path:
    return run_dir(name) / "state.json"


def init_argv(cfg_init: str, command: list[str]) -> list[str]:
    return list(command) if cfg_init == "plain" else ["/sbin/init"]


def check_rlimits(limits: dict[int, tuple[int, int]]) -> None:
    """A guest cannot raise a hard limit above the host's (that needs
    CAP_SYS_RESOURCE in the host's user namespace): say so before booting."""
    for res, (_, hard) in limits.items():
        host_hard = resource.getrlimit(res)[1]
        if host_hard != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > host_hard):
            name = next((n for n, r in RLIMITS.items() if r == res), str(res))
            raise errors.BadConfig(f"rlimits.{name}: the host's hard limit is {host_hard}, the guest cannot have more")


class BootError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


def _launcher(spec: Spec, net: netctx.Plan, to_c: int, from_c: int, err_w: int) -> None:
    """The forked launcher: unshare, become root of the new user namespace,
    configure its network namespace if it has one, fork PID 1 and report
    its pid.  Never returns."""
    code = 0
    # Nothing of the monitor's may leak into the guest (the caller's ready pipe, the FUSE fd).
    keep = sorted({0, 1, 2, to_c, from_c, err_w})
    for lo, hi in zip(keep, [*keep[1:], 1 << 16], strict=True):
        os.closerange(lo + 1, hi)
    try:
        if os.read(to_c, 1) != b"g":
            os._exit(1)
        k.unshare(NS_FLAGS | (k.CLONE_NEWNET if net.own_netns else 0))
        os.write(from_c, b"u")
        if os.read(to_c, 1) != b"m":
            os._exit(1)
        os.setresgid(0, 0, 0)
        os.setgroups([])
        os.setresuid(0, 0, 0)
        if net.own_netns:
            netctx.up_netns_inside(net)
        pid = os.fork()
        if pid == 0:
            try:
                setup_root(spec)
                become_init(spec)
            except BaseException as e:
                os.write(err_w, f"{e}".encode()[:2000])
            os._exit(127)
        os.write(from_c, f"{pid}\n".encode())
    except BaseException as e:
        os.write(err_w, f"{e}".encode()[:2000])
        code = 1
    os._exit(code)


class Monitor:
    def __init__(self, home: Home, name: str) -> None:
        self.home, self.name = home, name
        self.g = guests.load(home, name)
        cfg = self.g.cfg
        self.cg = GuestCgroups(name)
        self.rd = run_dir(name)
        self.mnt = self.rd / "root"
        self.init_pid = 0
        self.outcome = "halt"
        self.served: Served | None = None
        self.console_log = self.g.path / "console.log"
        self.failure: BaseException | None = None
        self.tell: Callable[[str], None] = lambda msg: None
        self.net = netctx.plan(cfg)
        self.spec = Spec(
            root=str(self.mnt),
            hostname=cfg.hostname,
            argv=init_argv(cfg.init, cfg.command),
            console="",
            env={"PATH": PATH, "TERM": "linux", "container": "vctx", "HOME": "/"},
            rlimits=cfg.resource_limits(),
            net_confined=self.net.mode == "isolated",
            own_netns=self.net.own_netns,
        )

    # --- boot -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything before the launch: made synchronously, torn down on failure."""
        cfg = self.g.cfg
        check_rlimits(self.spec.rlimits)
        self.rd.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        k.prctl(k.PR_SET_CHILD_SUBREAPER, 1)
        self.master, slave = os.openpty()
        os.set_blocking(self.master, False)
        self.spec.console = os.ttyname(slave)
        os.chown(slave, cfg.id_base, cfg.id_base + 5)  # the guest's root owns its console
        to_c_r, self.to_c = os.pipe()
        self.from_c, from_c_w = os.pipe()
        self.err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if self.net.own_netns:
            import pyroute2  # type: ignore[import-untyped]  # noqa: F401 - here: the launcher configures its namespace with it

        self.launcher = os.fork()  # before any thread exists: the child runs Python
        if self.launcher == 0:
            for fd in (self.to_c, self.from_c, self.err_r, self.master):
                os.close(fd)
            _launcher(self.spec, self.net, to_c_r, from_c_w, err_w)
        for fd in (to_c_r, from_c_w, err_w, slave):
            os.close(fd)
        try:
            netctx.check_unique(self.net, guests.configs(self.home))
            self.cg.create(cfg.limits, owner=cfg.id_base)
            self.cg.add(self.launcher)
            if self.net.mode == "isolated":
                netctx.up_isolated(self.net, self.cg.v2)
            opts = MountOptions(idmap=IdMap(cfg.id_base, cfg.id_base, cfg.id_size), suid=True)
            self.served = Served(str(self.g.rootfs), str(self.mnt), opts)
        except BaseException:
            os.kill(self.launcher, signal.SIGKILL)
            os.waitpid(self.launcher, 0)
            self.teardown()
            raise

    async def launch(self) -> None:
        """The handshake with the launcher, while the mount is being served
        (PID 1 builds its root on it)."""
        import trio

        cfg = self.g.cfg

        async def read(fd: int, n: int) -> bytes:
            await trio.lowlevel.wait_readable(fd)
            return os.read(fd, n)

        try:
            os.write(self.to_c, b"g")
            if await read(self.from_c, 1) != b"u":
                raise BootError(errors.BuildFailed.exit_code, await self._aerr() or "the launcher died")
            for kind in ("uid", "gid"):
                Path(f"/proc/{self.launcher}/{kind}_map").write_text(f"0 {cfg.id_base} {cfg.id_size}\n")
            if self.net.mode == "netns":
                netctx.up_netns_host(self.net, self.launcher)
            os.write(self.to_c, b"m")
            line = b""
            while not line.endswith(b"\n"):
                chunk = await read(self.from_c, 32)
                if not chunk:
                    break
                line += chunk
            os.waitpid(self.launcher, 0)
            if not line.strip().isdigit():
                raise BootError(errors.BuildFailed.exit_code, await self._aerr() or "the launcher died")
            self.init_pid = int(line)
            msg = await self._aerr()  # EOF without a word: init was exec'd
            if msg:
                raise BootError(errors.BuildFailed.exit_code, msg)
        finally:
            for fd in (self.to_c, self.from_c, self.err_r):
                os.close(fd)
        state = {
            "name": self.name,
            "monitor": os.getpid(),
            "init": self.init_pid,
            "started": time.time(),
            "home": str(self.home.root),
            "root": str(self.mnt),
            "style": cfg.init,
            "net": self.net.mode,
        }
        write_atomic(state_path(self.name), json.dumps(state).encode())

    async def _aerr(self) -> str:
        import trio

        chunks = []
        while True:
            await trio.lowlevel.wait_readable(self.err_r)
            chunk = os.read(self.err_r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace").strip()

    def teardown(self) -> None:
        """Kill whatever is left, unmount, remove cgroups and state."""
        if self.cg.exists():
            self.cg.kill()
        if self.served is not None and os.path.ismount(self.mnt):
            k.umount(str(self.mnt), lazy=True)
        self.cg_remove()
        try:
            netctx.down(self.name)
        except (OSError, errors.VctxError) as e:
            log.warning("cannot remove the network of %s: %s", self.name, e)
        state_path(self.name).unlink(missing_ok=True)

    def cg_remove(self) -> None:
        try:
            self.cg.remove()
        except OSError as e:
            log.warning("cannot remove cgroups of %s: %s", self.name, e)

    # --- supervision --------------------------------------------------------------

    async def supervise(self) -> None:
        import trio

        try:
            await self.launch()
        except BaseException as e:
            self.failure = e
            if self.init_pid:
                os.kill(self.init_pid, signal.SIGKILL)
            self.cg.kill()
            await self._wait_empty()
            return
        self.tell("ok")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain_console)
            nursery.start_soon(self._on_signals)
            pidfd = os.pidfd_open(self.init_pid)
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            _, status = os.waitpid(self.init_pid, 0)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP:
                self.outcome = "reboot"
            log.info("%s: init ended (%s): %s", self.name, status, self.outcome)
            # The kernel kills the rest of the PID namespace; wait until it is gone.
            await self._wait_empty()
            nursery.cancel_scope.cancel()

    async def _on_signals(self) -> None:
        """SIGTERM to the monitor (a host shutdown, an admin's kill) shuts
        the guest down the way `vctx stop` asks it, not by pulling its root."""
        import trio

        from .runtime import halt_signal

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                sig = halt_signal(self.g.cfg.init)
                log.info("%s: asked to stop", self.name)
                if sig is None:  # sysvinit: telinit, from inside
                    cmd = [sys.executable, "-m", "vctx", "exec", self.name, "--", "/sbin/telinit", "0"]
                    await trio.run_process(cmd, check=False, env={**os.environ, "VCTX_HOME": str(self.home.root)})
                    continue
                try:
                    os.kill(self.init_pid, sig)
                except ProcessLookupError:
                    return

    async def _wait_empty(self) -> None:
        import trio

        if self.cg.v2 is None:
            while self.cg.populated():
                await trio.sleep(0.02)
            return
        ino = _Inotify(str(self.cg.v2 / "cgroup.events"))
        try:
            while self.cg.populated():
                await trio.lowlevel.wait_readable(ino.fd)
                ino.drain()
        finally:
            ino.close()

    async def _drain_console(self) -> None:
        import trio

        out = os.open(self.console_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            while True:
                await trio.lowlevel.wait_readable(self.master)
                try:
                    data = os.read(self.master, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    return  # EIO: no one has the console open any more
                if os.fstat(out).st_size > CONSOLE_LOG_MAX:
                    os.ftruncate(out, 0)
                os.write(out, data)
        finally:
            os.close(out)

    def run(self) -> str:
        assert self.served is not None
        try:
            self.served.run(self.supervise, on_signals=False)
        finally:
            self.teardown()
        if self.failure is not None:
            raise self.failure
        return self.outcome


class _Inotify:
    IN_MODIFY = 0x2
    IN_NONBLOCK = 0o4000
    IN_CLOEXEC = 0o2000000

    def __init__(self, path: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, path.encode(), self.IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch", path)

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="vctx.monitor")
    ap.add_argument("name")
    ap.add_argument("--home")
    ap.add_argument("--ready-fd", type=int)
    args = ap.parse_args(argv)
    home = Home(args.home)
    logging.basicConfig(
        filename=str(home.guest(args.name) / "monitor.log"), level=logging.INFO, format="%(asctime)s %(message)s"
    )

    def tell(msg: str) -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, msg.encode())
            os.close(args.ready_fd)
            args.ready_fd = None

    try:
        m = Monitor(home, args.name)
        m.tell = tell
        m.prepare()
        outcome = m.run()
    except BootError as e:
        tell(f"E{e.code} cannot boot {args.name}: {e}")
        sys.exit(1)
    except errors.VctxError as e:
        tell(f"E{e.exit_code} {e}")
        sys.exit(1)
    except Exception as e:
        log.exception("boot failed")
        tell(f"E1 cannot boot {args.name}: {e}")
        sys.exit(1)
    if outcome == "reboot":
        log.info("%s: rebooting", args.name)
        os.execv(sys.executable, [sys.executable, "-m", "vctx.monitor", args.name, "--home", str(home.root)])


if __name__ == "__main__":
    main()
