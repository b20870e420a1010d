"""Mounting and unmounting: the cowfs daemon's life cycle.

`mount` checks its input, forks the daemon, and returns once the daemon says
the mount is ready (or relays its one-line error).  The daemon records its pid
under /run/cowfs, keyed by the mount's device number, so `umount` can wait for
it to exit cleanly after the kernel detaches the mount.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from . import errors
from .idmap import IdMap
from .sys import MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, attach, clone_tree, fsmount, raise_nofile_limit, umount

if TYPE_CHECKING:
    from .fs import CowFS
    from .fuse import Session
    from .model import CowTree, Lru


def _state_dir() -> Path:
    """Where daemons record themselves: /run/cowfs for root; for a user who
    mounts through fusermount3, a directory of their own (their runtime
    directory, else /tmp/cowfs-UID), which no one else can fill in."""
    if "COWFS_STATE_DIR" in os.environ:
        return Path(os.environ["COWFS_STATE_DIR"])
    uid = os.geteuid()
    if uid == 0:
        return Path("/run/cowfs")
    run = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    if os.path.isdir(run) and os.access(run, os.W_OK | os.X_OK):
        return Path(run) / "cowfs"
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"cowfs-{uid}"


STATE_DIR = _state_dir()


def _make_state_dir() -> None:
    try:
        STATE_DIR.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(STATE_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise errors.DaemonFailed(f"{STATE_DIR} is not a directory of its user's own: remove it")


log = logging.getLogger("cowfs")


@dataclass(frozen=True)
class MountOptions:
    idmap: IdMap = field(default_factory=IdMap)
    suid: bool = False
    dev: bool = False
    log_file: str | None = None
    debug: bool = False
    fd_budget: int | None = None  # fds for cached inodes; None: from RLIMIT_NOFILE
    shared_cache: bool = True  # shared files read through the shared inode's pages (shared.py)
    spin_us: int = 30  # keep reading this long after a request before sleeping (fuse.Session.serve)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    dev: str  # "major:minor"
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            out.append(MountEntry(int(a[0]), a[2], _unescape(a[4]), b[0], _unescape(b[1])))
    return out


def find_mount(mountpoint: str) -> MountEntry | None:
    """The topmost mount at mountpoint (by path; no stat, which a dead FUSE
    daemon would answer with ENOTCONN)."""
    found = None
    for m in mounts():
        if m.mountpoint == mountpoint:
            found = m
    return found


def _abs(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _state_file(dev: str) -> Path:
    return STATE_DIR / f"{dev}.json"


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def serving(tree: str) -> tuple[str, int | None] | None:
    """(mountpoint, daemon pid) of a live cowfs mount whose backing tree
    overlaps tree, from our mount namespace or any other (the state files)."""
    tree = os.path.realpath(tree)
    for m in mounts():
        if m.fstype == "fuse.cowfs" and _overlaps(os.path.realpath(m.source), tree):
            return m.mountpoint, None
    for f in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else ():
        try:
            state = json.loads(f.read_text())
            pid, backing = int(state["pid"]), str(state["backing"])
            os.kill(pid, 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # stale, unreadable or its daemon is gone
        if _overlaps(os.path.realpath(backing), tree):
            return str(state.get("mountpoint", "?")), pid
    return None


def check_mount_args(backing: str, mountpoint: str) -> tuple[str, str]:
    backing, mountpoint = _abs(backing), _abs(mountpoint)
    try:
        st = os.stat(backing)
    except FileNotFoundError:
        raise errors.BadBacking(f"backing tree {backing} does not exist") from None
    except OSError as e:
        raise errors.BadBacking(f"backing tree {backing}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise errors.BadBacking(f"backing tree {backing} is not a directory")
    if find_mount(mountpoint) is not None:
        raise errors.BadMountpoint(f"{mountpoint} is already a mount point")
    try:
        mst = os.stat(mountpoint)
    except FileNotFoundError:
        raise errors.BadMountpoint(f"mount point {mountpoint} does not exist") from None
    except OSError as e:
        raise errors.BadMountpoint(f"mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(mst.st_mode):
        raise errors.BadMountpoint(f"mount point {mountpoint} is not a directory")
    if os.listdir(mountpoint):
        raise errors.BadMountpoint(f"mount point {mountpoint} is not empty")
    if backing == mountpoint or mountpoint.startswith(backing + "/"):
        raise errors.BadMountpoint(f"mount point {mountpoint} lies inside the backing tree")
    if not os.path.exists("/dev/fuse"):
        raise errors.NoFuse("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise errors.NotPermitted("not root, and fusermount3 is not installed (apt install fuse3)")
    return backing, mountpoint


# The name under which the root looks itself up while being published.
PUBLISHED = "cowfs-root"


def _open_fuse(backing: str, mountpoint: str, opts: MountOptions) -> tuple[int, int]:
    """A FUSE connection: its /dev/fuse fd, and the filesystem as a detached
    mount that publish() attaches (or -1: fusermount3 mounted it already).

    As root this is the mount API itself; otherwise fusermount3 mounts and
    hands the fd back over a socket (its _FUSE_COMMFD protocol).
    """
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        attrs = (0 if opts.suid else MOUNT_ATTR_NOSUID) | (0 if opts.dev else MOUNT_ATTR_NODEV)
        strings = {
            "fd": str(fd),
            "rootmode": f"{stat.S_IFDIR:o}",
            "user_id": "0",
            "group_id": "0",
            "source": backing,
            "subtype": "cowfs",
        }
        try:
            return fd, fsmount("fuse", strings, ["default_permissions", "allow_other"], attrs)
        except BaseException:
            os.close(fd)
            raise
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fsname = backing.replace("\\", "\\\\").replace(",", "\\,")
    o = f"default_permissions,fsname={fsname},subtype=cowfs,{'suid' if opts.suid else 'nosuid'},{'dev' if opts.dev else 'nodev'}"
    env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
    res = subprocess.run(
        ["fusermount3", "-o", o, "--", mountpoint], env=env, pass_fds=(theirs.fileno(),), capture_output=True, text=True
    )
    theirs.close()
    if res.returncode != 0:
        ours.close()
        raise errors.NotPermitted(res.stderr.strip() or "fusermount3 failed")
    _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    ours.close()
    if not fds:
        raise errors.DaemonFailed("fusermount3 did not pass the FUSE fd")
    return fds[0], -1


def publish(session: Session, fs: CowFS, mnt: int, mountpoint: str) -> None:
    """Attach the detached mount mnt at mountpoint, as a bind of its root's
    alias (model.ROOT_ALIAS), then close mnt.

    Why not the filesystem's own root: the kernel makes that inode before
    INIT has said that the kernel checks ACLs, and marks it never to cache
    them (fs/fuse/inode.c).  Every path walk through it by a process that
    does not own it (any guest user but root) then asked us for its
    system.posix_acl_access, twice for /lib/... (merged /usr): an open
    cost 53 us against 19 for root.  The alias is looked up after INIT,
    and caches them like any other inode.

    The lookup needs answers (INIT, LOOKUP), so it runs in a thread while
    the session serves here.  A kernel that refuses to clone a detached
    mount (EINVAL) gets the filesystem itself, as before, and the alias's
    name is dropped from its root (else / would hold itself).
    """
    from .model import ROOT

    fs.publishing = PUBLISHED.encode()

    def attach_alias() -> bool:
        try:
            tree = clone_tree(mnt, PUBLISHED)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            attach(mnt, mountpoint)
            return False
        try:
            attach(tree, mountpoint)
        finally:
            os.close(tree)
        return True

    try:
        aliased = session.serve_during(attach_alias)
    finally:
        fs.publishing = None
        os.close(mnt)
    if not aliased:
        session.inval_entry(ROOT, PUBLISHED.encode())


READAHEAD_KB = 1024


def _raise_readahead(dev: str) -> None:
    """Let sequential reads reach us as 1 MiB requests, not 128 KiB ones
    (the kernel's default readahead for a FUSE connection)."""
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(str(READAHEAD_KB))
    except OSError as e:  # not fatal: only slower cold reads
        log.warning("cannot raise readahead of %s: %s", dev, e)


def scanned_tree(backing: str, opts: MountOptions, lru: Lru | None = None) -> CowTree:
    """The backing tree, scanned (link counts, leftover temporaries): all a
    mount needs of it before it can be served."""
    from .model import CowTree

    limit = raise_nofile_limit()
    budget = opts.fd_budget or max(64, min(limit - 1024, 1 << 16))
    tree = CowTree(backing, opts.idmap, fd_budget=budget, lru=lru)
    try:
        tree.scan()
    except BaseException:
        tree.destroy()
        raise
    return tree


class Served:
    """A mounted cowfs, ready to be served by run() (a process of its own)
    or by serve() (a task in a loop serving other mounts too)."""

    def __init__(
        self, backing: str, mountpoint: str, opts: MountOptions, lru: Lru | None = None, tree: CowTree | None = None
    ) -> None:
        """tree: scanned_tree(backing, opts, lru), if the caller made it
        already (vctxd does, while the guest's cgroups are made); ours now."""
        from .fs import CowFS

        self.backing, self.mountpoint, self.opts = backing, mountpoint, opts
        self.tree = tree if tree is not None else scanned_tree(backing, opts, lru)
        self.fs = CowFS(self.tree)
        try:
            self.fuse_fd, mnt = _open_fuse(backing, mountpoint, opts)
        except BaseException:
            self.tree.destroy()
            raise
        self.session = self._session()
        if mnt >= 0:
            try:
                publish(self.session, self.fs, mnt, mountpoint)
            except BaseException:
                self.session.close()
                self.tree.destroy()
                os.close(self.fuse_fd)  # the detached mount is gone: the connection ends
                raise
        entry = find_mount(mountpoint)
        if entry is not None:
            _raise_readahead(entry.dev)
        self.state = _state_file(entry.dev) if entry else None
        if self.state is not None:
            _make_state_dir()
            tmp = self.state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "backing": backing, "mountpoint": mountpoint}))
            tmp.rename(self.state)
        log.info("serving %s on %s (%d temporaries cleaned)", backing, mountpoint, self.tree.stats.temps_removed)

    def _session(self) -> Session:
        from .fs import INIT_FLAGS
        from .fuse import PASSTHROUGH, Session

        flags = INIT_FLAGS if self.opts.shared_cache else INIT_FLAGS & ~PASSTHROUGH
        session = Session(
            self.fuse_fd,
            self.fs.handlers(),
            self.fs.slow(),
            flags,
            self.tree.fds.lru.lock,
            self.opts.spin_us,
            self.tree.file_held,
        )
        session.on_init = lambda taken: self.fs.took(taken, self.fuse_fd)
        return session

    def run(self) -> None:
        """Serve in this thread until unmounted (the standalone daemon: no
        trio, whose import would delay the first request by ~50 ms), then
        close().  SIGTERM/SIGINT detach the mount; the kernel then ends the
        connection once its last user is gone."""
        session = self.session

        def detach(signum: int, frame: FrameType | None) -> None:
            umount(self.mountpoint, lazy=True)

        before = {sig: signal.signal(sig, detach) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            session.serve()
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
            self.close()

    async def serve(self, companion: Callable[[], Awaitable[None]]) -> None:
        """Serve, from a thread of its own, while companion runs in the
        caller's trio loop (vctxd: the guest's supervision); when it returns
        the mount is detached, and serving ends when its last user goes.
        close() afterwards."""
        import trio

        session = self.session
        async with trio.open_nursery() as nursery:

            async def with_companion() -> None:
                try:
                    await companion()
                finally:
                    umount(self.mountpoint, lazy=True)

            nursery.start_soon(with_companion)
            # Its own limiter: trio's default allows 40 threads in all, and
            # vctxd serves a mount per guest.
            try:
                await trio.to_thread.run_sync(session.serve, limiter=trio.CapacityLimiter(1), abandon_on_cancel=True)
            finally:
                if not session.finished.is_set():  # cancelled: the thread must be gone before close()
                    session.stop()
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(session.finished.wait, limiter=trio.CapacityLimiter(1))
            nursery.cancel_scope.cancel()

    def close(self) -> None:
        self.session.close()
        self.tree.destroy()
        os.close(self.fuse_fd)
        if self.state is not None:
            self.state.unlink(missing_ok=True)
        log.info("stopped: %d breaks, %d marks cleared", self.tree.stats.breaks, self.tree.stats.unmarks)


def serve(backing: str, mountpoint: str, opts: MountOptions, ready_fd: int | None) -> None:
    """Mount and serve until unmounted; tell ready_fd "ok" or the error."""

    def tell(msg: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)

    try:
        served = Served(backing, mountpoint, opts)
    except Exception as e:  # report any start-up failure as one line to the caller
        tell(f"E{errors.DaemonFailed.exit_code} cannot mount {mountpoint}: {e}")
        raise SystemExit(1) from None
    tell("ok")
    served.run()


def _setup_logging(opts: MountOptions) -> None:
    level = logging.DEBUG if opts.debug else logging.INFO
    if opts.log_file:
        logging.basicConfig(filename=opts.log_file, level=level, format="%(asctime)s %(levelname)s %(message)s")
    else:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def mount(backing: str, mountpoint: str, opts: MountOptions, foreground: bool = False) -> None:
    backing, mountpoint = check_mount_args(backing, mountpoint)
    if foreground:
        _setup_logging(opts)
        serve(backing, mountpoint, opts, None)
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        _setup_logging(opts)
        code = 0
        try:
            serve(backing, mountpoint, opts, w)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("daemon failed")
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    msg = b"".join(chunks).decode(errors="replace")
    if msg == "ok":
        return
    os.waitpid(pid, 0)
    if msg.startswith("E"):
        code_text, _, text = msg[1:].partition(" ")
        err = errors.DaemonFailed(text)
        err.exit_code = int(code_text)
        raise err
    raise errors.DaemonFailed(f"the cowfs daemon for {mountpoint} died before the mount was ready")


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """True once pid has exited (at once if it is gone), False after timeout seconds."""
    try:
        pfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        p = select.poll()
        p.register(pfd, select.POLLIN)
        return bool(p.poll(timeout * 1000))
    finally:
        os.close(pfd)


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 60.0) -> None:
    mountpoint = _abs(mountpoint)
    entry = find_mount(mountpoint)
    if entry is None or entry.fstype != "fuse.cowfs":
        raise errors.NotMounted(f"{mountpoint} is not a cowfs mount")
    state = _state_file(entry.dev)
    pid = None
    try:
        pid = int(json.loads(state.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        if os.geteuid() == 0:
            umount(mountpoint, lazy=lazy)
        else:
            args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
            res = subprocess.run(args, capture_output=True, text=True)
            if res.returncode != 0:
                if "busy" in res.stderr:
                    raise OSError(16, "busy")
                raise errors.NotPermitted(res.stderr.strip() or f"fusermount3 failed on {mountpoint}")
    except OSError as e:
        if e.errno == 16:  # EBUSY
            raise errors.Busy(
                f"{mountpoint} is busy (open files or a working directory inside); "
                "close them, or detach it now with --lazy"
            ) from None
        raise
    if lazy or pid is None:
        return
    if not wait_pid_exit(pid, timeout):
        raise errors.DaemonFailed(f"the cowfs daemon (pid {pid}) did not exit within {timeout:.0f}s")
