"""One running guest, as vctxd (daemon.py) holds it: its cowfs mount, its
init, its console.

For each guest the daemon:

1. asks the forker (zygote.py) for a launcher, makes the guest's cgroups and
   puts the launcher in them, mounts the guest's tree with cowfs (ids
   shifted into the guest's range) — in a worker thread, so the guests
   already running are served meanwhile;
2. lets the launcher unshare its namespaces, writes its uid/gid maps, and
   the launcher forks the guest's PID 1, which builds the root (context.py)
   and execs init;
3. serves the FUSE mount and waits for init, draining the console into
   console.log;
4. when init dies, waits for the context to empty, unmounts, removes the
   cgroups — and on a guest's reboot (init killed by SIGHUP: reboot(2) in a
   PID namespace) boots it again.

The daemon is a subreaper, so PID 1 becomes its child once the launcher
exits, and it alone reads init's wait status.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cowfs.daemon import MountOptions, Served, find_mount, scanned_tree
from cowfs.idmap import IdMap

from . import errors, netctx
from . import guest as guests
from . import sys as k
from .cgroups import GuestCgroups
from .config import RLIMITS
from .context import Spec, become_init, setup_root
from .files import write_atomic
from .home import Home

if TYPE_CHECKING:
    from cowfs.model import CowTree, Lru

RUN = Path(os.environ.get("VCTX_RUN", "/run/vctx"))
NS_FLAGS = k.CLONE_NEWUSER | k.CLONE_NEWNS | k.CLONE_NEWUTS | k.CLONE_NEWIPC | k.CLONE_NEWPID | k.CLONE_NEWCGROUP
CONSOLE_LOG_MAX = 1 << 20
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
log = logging.getLogger("vctx.daemon")


def run_dir(name: str) -> Path:
    return RUN / name


def standby_path(name: str) -> Path:
    """Where the forker names the guest's exec standby (zygote.py)."""
    return run_dir(name) / "standby"


def standby_pid(name: str) -> int | None:
    try:
        return int(standby_path(name).read_text())
    except (OSError, ValueError):
        return None


def state_path(name: str) -> Path:
    return run_dir(name) / "state.json"


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (fields[0] is the state), or
    None if pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def proc_start(pid: int) -> int | None:
    """When pid started (clock ticks since boot); None if it is gone or a zombie."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] in ("Z", "X") else int(fields[19])


def children_exited() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of each child that has exited, reaping it."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


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


def check_init(g: guests.Guest) -> None:
    """The guest's tree has an init for its style."""
    cfg = g.cfg
    if cfg.init == "plain":
        prog = cfg.command[0]
        if not prog.startswith("/"):
            raise errors.BadConfig(f'command[0] must be an absolute path in the guest, not "{prog}"')
        path = prog.lstrip("/")
    else:
        path = "sbin/init"
    p = g.rootfs / path
    if not (p.is_symlink() or p.exists()):
        raise errors.BadConfig(f"guest {g.name} has no /{path} for init style {cfg.init}")


class BootError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


def launcher(spec: Spec, net: netctx.Plan, to_c: int, from_c: int, err_w: int) -> None:
    """The launcher, forked by the forker (zygote.py): unshare, become root of the new user namespace,
    configure its network namespace if it has one, fork PID 1 and report
    its pid.  Never returns."""
    code = 0
    # Nothing of the forker's may leak into the guest (its sockets, a client's fds).
    keep = sorted({0, 1, 2, to_c, from_c, err_w})
    for lo, hi in zip(keep, [*keep[1:], 1 << 16], strict=True):
        os.closerange(lo + 1, hi)
    try:
        if os.read(to_c, 1) != b"g":
            os._exit(1)
        # The mount namespace comes last: a plain root is mounted on the
        # host (idmapped with this user namespace) between "u" and "m", and
        # the copy of the host's mounts must have it.
        k.unshare((NS_FLAGS & ~k.CLONE_NEWNS) | (k.CLONE_NEWNET if net.own_netns else 0))
        os.write(from_c, b"u")
        if os.read(to_c, 1) != b"m":
            os._exit(1)
        os.setresgid(0, 0, 0)
        os.setgroups([])
        os.setresuid(0, 0, 0)
        k.unshare(k.CLONE_NEWNS)
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


Launch = Callable[[Spec, netctx.Plan, list[int]], int]
WaitChild = Callable[[int], Awaitable[int]]


def guest_log(home: Home, name: str) -> logging.Logger:
    """A logger writing to the guest's monitor.log (the daemon's log has the rest)."""
    lg = logging.getLogger(f"vctx.guest.{name}")
    if not lg.handlers:
        h = logging.FileHandler(home.guest(name) / "monitor.log")
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return lg


def close_log(lg: logging.Logger) -> None:
    for h in list(lg.handlers):
        lg.removeHandler(h)
        h.close()


def _drop(scan: Future[CowTree]) -> None:
    """The boot failed before the scanned tree was served: close what it opened."""
    if scan.exception() is None:  # (waits for the scan to end)
        scan.result().destroy()


class Monitor:
    """One boot of one guest, from prepare() to the end of run()."""

    def __init__(self, home: Home, name: str, launch: Launch, lru: Lru | None = None) -> None:
        self.home, self.name = home, name
        self.g = guests.load(home, name)
        cfg = self.g.cfg
        self.launch_via = launch
        self.lru = lru
        self.cg = GuestCgroups(name)
        self.rd = run_dir(name)
        self.mnt = self.rd / "root"
        self.init_pid = 0
        self.launcher = 0
        self.launcher_fd = -1
        self.outcome = "halt"
        self.started = False
        self.served: Served | None = None
        self.console_log = self.g.path / "console.log"
        self.failure: BaseException | None = None
        self.log = guest_log(home, name)
        self.t0 = time.monotonic()
        self.t_prepared = 0.0
        self.net = netctx.plan(cfg)
        self.spec = Spec(
            root=str(self.mnt),
            hostname=cfg.hostname,
            argv=init_argv(cfg.init, cfg.command),
            console="",
            env={"PATH": PATH, "TERM": "linux", "container": "vctx", "HOME": "/"},
            rlimits=cfg.resource_limits(),
            net_confined=self.net.mode == "isolated",
            allow_syscalls=tuple(cfg.allow_syscalls),
            own_netns=self.net.own_netns,
        )

    # --- boot -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything before the launch: made synchronously (in a worker
        thread of the daemon), torn down on failure."""
        cfg = self.g.cfg
        check_init(self.g)
        check_rlimits(self.spec.rlimits)
        cleanup(self.name, quiet=True)  # a crashed boot's leftovers must not stop this one
        self.rd.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        self.master, slave = os.openpty()
        os.set_blocking(self.master, False)
        self.spec.console = os.ttyname(slave)
        os.chown(slave, cfg.id_base, cfg.id_base + 5)  # the guest's root owns its console
        to_c_r, self.to_c = os.pipe2(os.O_CLOEXEC)
        self.from_c, from_c_w = os.pipe2(os.O_CLOEXEC)
        self.err_r, err_w = os.pipe2(os.O_CLOEXEC)
        opts = MountOptions(
            idmap=IdMap(cfg.id_base, cfg.id_base, cfg.id_size), suid=True, shared_cache=cfg.page_cache == "shared"
        )
        # The tree's scan (Python, ~20 ms for a Debian tree) runs while this
        # thread waits in the kernel: the first move into a cgroup waits out
        # an RCU grace period (5-30 ms here), the BPF programs load.
        pool = ThreadPoolExecutor(2, thread_name_prefix="boot")
        scan: Future[CowTree] | None = None
        if cfg.root == "cowfs":
            scan = pool.submit(scanned_tree, str(self.g.rootfs), opts, self.lru)
        try:
            self.launcher = self.launch_via(self.spec, self.net, [to_c_r, from_c_w, err_w])
            self.launcher_fd = os.pidfd_open(self.launcher)
        except BaseException:
            for fd in (self.to_c, self.from_c, self.err_r, self.master):
                os.close(fd)
            if scan is not None:
                _drop(scan)
            pool.shutdown(wait=False)
            raise
        finally:
            for fd in (to_c_r, from_c_w, err_w, slave):
                os.close(fd)
        try:
            netctx.check_unique(self.net, guests.configs(self.home))
            self.cg.create(cfg.limits, owner=cfg.id_base)
            # That wait is a sleep: the network's maps and programs are made
            # meanwhile (~9 ms), which need the cgroup but not its members.
            joined = pool.submit(self.cg.add, self.launcher)
            pool.shutdown(wait=False)  # its threads end with the scan and the move
            try:
                if self.net.mode == "isolated":
                    netctx.up_isolated(self.net, self.cg.v2)
            finally:
                joined.result()
            if scan is not None:
                tree, scan = scan.result(), None
                self.served = Served(str(self.g.rootfs), str(self.mnt), opts, lru=self.lru, tree=tree)
            self.t_prepared = time.monotonic()
        except BaseException:
            pool.shutdown(wait=False)
            if scan is not None:
                _drop(scan)
            signal.pidfd_send_signal(self.launcher_fd, signal.SIGKILL)
            for fd in (self.to_c, self.from_c, self.err_r, self.master, self.launcher_fd):
                os.close(fd)
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
            if cfg.root == "plain":
                self._mount_plain()
            os.write(self.to_c, b"m")
            line = b""
            while not line.endswith(b"\n"):
                chunk = await read(self.from_c, 32)
                if not chunk:
                    break
                line += chunk
            if line.strip().isdigit():
                self.init_pid = int(line)
            # The launcher exits once it has reported: init is then ours.
            await trio.lowlevel.wait_readable(self.launcher_fd)
            if not self.init_pid:
                raise BootError(errors.BuildFailed.exit_code, await self._aerr() or "the launcher died")
            msg = await self._aerr()  # EOF without a word: init was exec'd
            if msg:
                raise BootError(errors.BuildFailed.exit_code, msg)
        finally:
            for fd in (self.to_c, self.from_c, self.err_r, self.launcher_fd):
                os.close(fd)
        state = {
            "name": self.name,
            "monitor": os.getpid(),
            "monitor_start": proc_start(os.getpid()),
            "init": self.init_pid,
            "init_start": proc_start(self.init_pid),
            "started": time.time(),
            "home": str(self.home.root),
            "root": str(self.mnt),
            "style": cfg.init,
            "net": self.net.mode,
            "allow_syscalls": list(self.spec.allow_syscalls),
        }
        write_atomic(state_path(self.name), json.dumps(state).encode(), durable=False)

    def _mount_plain(self) -> None:
        """A plain root: the guest's tree bind-mounted with the ids of the
        launcher's user namespace, so the template's root-owned files are
        the guest root's, with no FUSE server in between."""
        uns = os.open(f"/proc/{self.launcher}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            k.idmapped_bind(str(self.g.rootfs), str(self.mnt), uns)
        except OSError as e:
            raise BootError(
                errors.HostLacks.exit_code,
                f"cannot mount {self.g.rootfs} with the guest's ids ({e.strerror}): idmapped mounts need"
                " Linux 5.12+ and a filesystem that has them (ext4, xfs, btrfs, tmpfs)",
            ) from None
        finally:
            os.close(uns)

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
        while find_mount(str(self.mnt)) is not None:  # (a plain root's bind mount fools os.path.ismount)
            k.umount(str(self.mnt), lazy=True)
        try:
            self.cg.remove()
        except OSError as e:
            self.log.warning("cannot remove cgroups of %s: %s", self.name, e)
        try:
            netctx.down(self.name)
        except (OSError, errors.VctxError) as e:
            self.log.warning("cannot remove the network of %s: %s", self.name, e)
        state_path(self.name).unlink(missing_ok=True)
        remove_run_dir(self.name)

    # --- supervision --------------------------------------------------------------

    async def run(self, wait_child: WaitChild, task_status: Any) -> str:
        """Serve the mount and supervise init until the guest is gone;
        task_status.started() once init runs.  Returns halt or reboot."""
        try:
            if self.served is not None:
                await self.served.serve(lambda: self.supervise(wait_child, task_status))
            else:  # a plain root: the kernel serves it
                await self.supervise(wait_child, task_status)
        finally:
            if self.served is not None:
                self.served.close()
            self.teardown()
            os.close(self.master)
        if self.failure is not None:
            raise self.failure
        return self.outcome

    async def supervise(self, wait_child: WaitChild, task_status: Any) -> None:
        import trio

        try:
            await self.launch()
        except Exception as e:
            self.failure = e
            if self.init_pid:
                os.kill(self.init_pid, signal.SIGKILL)
                await wait_child(self.init_pid)
            self.cg.kill()
            await self._wait_empty()
            return
        self.started = True
        self.log.info(
            "%s: booted, init pid %d, in %.0f ms (cgroups, network and mount %.0f ms)",
            self.name,
            self.init_pid,
            (time.monotonic() - self.t0) * 1000,
            (self.t_prepared - self.t0) * 1000,
        )
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain_console)
            status = await wait_child(self.init_pid)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP:
                self.outcome = "reboot"
            self.log.info("%s: init ended (%s): %s", self.name, status, self.outcome)
            # The kernel kills the rest of the PID namespace; wait until it is gone.
            await self._wait_empty()
            nursery.cancel_scope.cancel()

    def ask_stop(self) -> None:
        """Ask init to shut down as `vctx stop` does (blocks for sysvinit's telinit)."""
        from .runtime import ask_halt

        self.log.info("%s: asked to stop", self.name)
        ask_halt(self.home, self.name, self.g.cfg.init, self.init_pid)

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


def cleanup(name: str, quiet: bool = False) -> None:
    """Make sure nothing of a stopped guest remains: processes, mount, cgroups."""
    cg = GuestCgroups(name)
    if cg.exists():
        cg.kill()
        deadline = time.monotonic() + 10
        while cg.populated() and time.monotonic() < deadline:
            time.sleep(0.01)
        if cg.populated() and not quiet:
            raise errors.VctxError(f"processes of {name} survive SIGKILL: {cg.pids()}")
    mnt = str(run_dir(name) / "root")
    while find_mount(mnt) is not None:
        k.umount(mnt, lazy=True)
    cg.remove()
    netctx.down(name)
    state_path(name).unlink(missing_ok=True)
    remove_run_dir(name)
    if cg.exists() and not quiet:
        raise errors.VctxError(f"cannot remove the cgroups of {name}")


def remove_run_dir(name: str) -> None:
    """/run/vctx/NAME and its mount point, once nothing is mounted there
    (rmdir: anything else left in it stays, and so does the directory)."""
    for d in (run_dir(name) / "root", run_dir(name)):
        try:
            d.rmdir()
        except OSError:
            return


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
