"""The FUSE kernel protocol on /dev/fuse, served by a thread of its own.

Why not a binding: the levers that keep Python off the hot path are
negotiated in INIT and in how OPEN and OPENDIR are answered.  Answering them
ENOSYS makes the kernel stop sending them for good and cache file pages and
whole directory listings itself (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR);
FUSE_CACHE_SYMLINKS caches link targets; FLUSH answered ENOSYS stops a
request per close.  A warm tree is then served by the kernel alone.  pyfuse3
(3.5, on libfuse 3.14) negotiates none of these and hands read and readdir
handlers a file handle but never the inode, so they cannot be used there.

Layouts follow <linux/fuse.h>, protocol 7.40; the kernel speaks the lower of
its version and ours.  Handlers receive the request header and body and
return the reply payload, or raise OSError; an errno goes back to the caller.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .sys import fuse_clone
from .tasks import Scheduler

log = logging.getLogger("cowfs")

MAJOR, MINOR = 7, 40

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH = 17, 18, 20, 21, 22, 23, 24, 25
INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT = 26, 27, 28, 29, 30, 34, 35, 36
IOCTL, DESTROY, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2 = 39, 38, 41, 42, 43, 44, 45

# INIT flags
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37  # in flags2; excludes WRITEBACK_CACHE (fs/fuse/inode.c)

# OPEN reply flags
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# SETATTR valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 64, 128, 256
FATTR_KILL_SUIDGID = 1 << 11
WRITE_KILL_SUIDGID = 1 << 2  # fuse_write_in.write_flags

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_HEAD = struct.Struct("<QQQQII")
ATTR_OUT_HEAD = struct.Struct("<QII")
INIT_IN = struct.Struct("<IIIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
RELEASE_IN = struct.Struct("<QIIQ")
STATFS_OUT = struct.Struct("<QQQQQIIII6I")
SETXATTR_IN = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
FSYNC_IN = struct.Struct("<QII")
FALLOCATE_IN = struct.Struct("<QQQII")
DIRENT_HEAD = struct.Struct("<QQII")
NOTIFY_INVAL_ENTRY = struct.Struct("<QII")
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")

MAX_WRITE = 1 << 20
MAX_PAGES_N = MAX_WRITE // 4096
BUFSIZE = MAX_WRITE + 4096 * 2
TIMEOUT_S = 86400  # entry and attribute validity (see fs.py)

NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY}

NOTIFY_RETRIEVE = 5  # a notify code: the kernel answers with a NOTIFY_REPLY request
NOTIFY_RETRIEVE_OUT = struct.Struct("<QQQII")  # notify_unique, nodeid, offset, size, padding

# How long another thread may keep the GIL from a serving thread that wants
# it back (Python's default is 5 ms).  A serving thread holds it for some
# microseconds per request and gives it up in every read of /dev/fuse; but
# while vctxd runs Python beside it (a guest's set-up as the guest starts),
# each request back from the kernel waited for that thread's interval to
# run out: a booting guest's generators stalled 0.7-2.5 ms at a time.
# Measured, a bookworm boot: 344 ms with the default, 324 ms with this
# (medians of 12, alternating).  Process-wide: set by the serving loop, as
# any process that serves a mount wants it.
SWITCH_INTERVAL_S = 0.0002

_IOCTL_OP = struct.pack("<I", IOCTL)
_RELEASE_OP = struct.pack("<I", RELEASE)
_NO_FH = bytes(8)
_OK_HEAD = struct.pack("<Ii", OUT_HEADER.size, 0)  # then the request's unique
_ENOTTY_HEAD = struct.pack("<Ii", OUT_HEADER.size, -errno.ENOTTY)  # then the request's unique


def _gone(e: OSError) -> bool:
    """A failed read of /dev/fuse, as every serving loop reads it: True once
    the mount is gone (ENODEV), False for a read to try again (EINTR; ENOENT:
    an interrupted request dropped as it was read, as libfuse reads it);
    anything else is raised."""
    if e.errno == errno.ENODEV:
        return True
    if e.errno in (errno.EINTR, errno.ENOENT):
        return False
    raise e


@dataclass(frozen=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def cstr(body: memoryview, start: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated name in body at start, and the offset after it."""
    raw = body[start:].tobytes()
    end = raw.index(b"\0")
    return raw[:end], start + end + 1


def pack_attr(ino: int, st: os.stat_result, nlink: int, uid: int, gid: int) -> bytes:
    a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns  # each access makes a new int: once
    return ATTR.pack(
        ino,
        st.st_size,
        st.st_blocks,
        a // 1_000_000_000,
        m // 1_000_000_000,
        c // 1_000_000_000,
        a % 1_000_000_000,
        m % 1_000_000_000,
        c % 1_000_000_000,
        st.st_mode,
        nlink,
        uid,
        gid,
        st.st_rdev & 0xFFFFFFFF,
        st.st_blksize,
        0,
    )


def pack_entry(nodeid: int, attr: bytes, timeout: int = TIMEOUT_S) -> bytes:
    return ENTRY_HEAD.pack(nodeid, 0, timeout, timeout, 0, 0) + attr


def pack_attr_out(attr: bytes) -> bytes:
    return ATTR_OUT_HEAD.pack(TIMEOUT_S, 0, 0) + attr


def pad8(n: int) -> int:
    return (n + 7) & ~7


Handler = Callable[[Request, memoryview], bytes | None]
AsyncHandler = Callable[[Request, memoryview], Coroutine[Any, Any, bytes | None]]


class Session:
    """One mounted FUSE connection: reads requests, dispatches, replies.

    serve() blocks the thread it runs in: epoll on /dev/fuse, and each
    request answered inline, holding the model's lock, one at a time, so
    each handler is atomic.  A handler that may block (a link break copies
    data in a thread) is given to `slow`, which decides per request whether
    it must run as a coroutine on the scheduler (tasks.py).
    """

    # Sessions serving in this process: spinning is for a lone one (serve()).
    _serving = 0
    _serving_lock = threading.Lock()

    def __init__(
        self,
        fd: int,
        handlers: dict[int, Handler],
        slow: dict[int, tuple[Callable[[Request, memoryview], bool], AsyncHandler]],
        init_flags: int,
        lock: threading.Lock | None = None,
        spin_us: int = 0,
        file_held: Callable[[], int] | None = None,
    ) -> None:
        """file_held: the node number of a regular file whose inode the
        kernel holds, or 0; without one, serve() never sleeps in a read
        that stop() could not end (see there)."""
        self.fd = fd
        self.out = fd  # where replies go: the fd the request came from (serve())
        self.bfd = -1  # serve()'s blocking clone of fd, while it serves
        self.file_held = file_held or (lambda: 0)
        self.spin_ns = spin_us * 1000 if len(os.sched_getaffinity(0)) > 1 else 0
        self.handlers = handlers
        self.slow = slow
        self.want = init_flags
        self.proto_minor = 0
        self.flags = 0
        self.destroyed = False
        self.lock = lock if lock is not None else threading.Lock()
        self.sched = Scheduler()
        self.stopping = False
        self.finished = threading.Event()  # serve() has returned
        self.on_init: Callable[[int], None] | None = None  # told the flags taken

    # -- replies --------------------------------------------------------

    def _write(self, *parts: bytes, fd: int = -1) -> None:
        """To the fd the request being answered was read from (the kernel
        finds a request among those read from the same fd only), or fd."""
        if fd < 0:
            fd = self.out
        try:
            if len(parts) == 1:
                os.write(fd, parts[0])
            else:
                os.writev(fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted and the kernel dropped it.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def reply(self, unique: int, payload: bytes = b"") -> None:
        head = OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique)
        if len(payload) < 4096:
            self._write(head + payload)
        else:  # a read's data: not copied once more to sit behind the header
            self._write(head, payload)

    def reply_err(self, unique: int, err: int) -> None:
        self._write(OUT_HEADER.pack(OUT_HEADER.size, -err, unique))

    def notify(self, code: int, payload: bytes) -> None:
        """Unsolicited message (unique 0, error = notify code)."""
        self._write(OUT_HEADER.pack(OUT_HEADER.size + len(payload), code, 0) + payload, fd=self.fd)

    def inval_entry(self, parent: int, name: bytes) -> None:
        self.notify(3, NOTIFY_INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0")

    def inval_inode(self, ino: int) -> None:
        self.notify(2, NOTIFY_INVAL_INODE.pack(ino, 0, -1))

    # -- the loop -------------------------------------------------------

    def _init(self, req: Request, body: memoryview) -> bytes:
        major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(body)
        if major != MAJOR:
            raise OSError(errno.EPROTO, f"kernel speaks FUSE {major}.{minor}, we speak {MAJOR}.{MINOR}")
        self.proto_minor = min(minor, MINOR)
        offered = flags | (flags2 << 32 if flags & INIT_EXT else 0)
        taken = offered & self.want
        if taken & PASSTHROUGH:
            # The kernel refuses passthrough alongside writeback caching.
            taken &= ~WRITEBACK_CACHE
        self.flags = taken | (INIT_EXT if taken >> 32 else 0)
        if self.on_init is not None:
            self.on_init(self.flags)
        log.debug("FUSE %d.%d, flags offered %#x, taken %#x", major, minor, offered, self.flags)
        return INIT_OUT.pack(
            MAJOR,
            MINOR,
            max_readahead,
            self.flags & 0xFFFFFFFF,
            64,  # max_background
            48,  # congestion_threshold
            MAX_WRITE,
            1,  # time_gran: nanoseconds
            MAX_PAGES_N,
            0,
            self.flags >> 32,
            1 if self.flags & PASSTHROUGH else 0,  # max_stack_depth: backing files on a plain filesystem
            *([0] * 6),
        )

    def _dispatch(self, data: bytes) -> None:
        body = memoryview(data)
        _len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(body)
        req = Request(opcode, unique, nodeid, uid, gid, pid)
        body = body[IN_HEADER.size :]
        if opcode == INIT:
            self._run(req, body, self._init)
            return
        if opcode == DESTROY:
            self.destroyed = True
            self.reply(unique)
            return
        slow = self.slow.get(opcode)
        if slow is not None and slow[0](req, body):
            # the request's buffer is not ours past this call: the coroutine gets a copy
            self.sched.spawn(slow[1](req, memoryview(bytes(body))), functools.partial(self._finish, req, self.out))
            return
        handler = self.handlers.get(opcode)
        if handler is None:
            if opcode not in NO_REPLY:
                self.reply_err(unique, errno.ENOSYS)
            return
        self._run(req, body, handler)

    def _run(self, req: Request, body: memoryview, handler: Handler) -> None:
        try:
            out = handler(req, body)
        except OSError as e:
            if req.opcode not in NO_REPLY:
                self.reply_err(req.unique, e.errno or errno.EIO)
            return
        if req.opcode not in NO_REPLY:
            self.reply(req.unique, out or b"")

    def _finish(self, req: Request, fd: int, out: object, error: BaseException | None) -> None:
        """A slow request's coroutine ended; fd: the one it came from."""
        self.out = fd
        if error is None:
            assert out is None or isinstance(out, bytes)
            self.reply(req.unique, out or b"")
        elif isinstance(error, OSError):
            self.reply_err(req.unique, error.errno or errno.EIO)
        else:
            self.reply_err(req.unique, errno.EIO)
            raise error  # a bug: stays loud

    def serve(self) -> None:
        """Until the kernel says the mount is gone (ENODEV) or DESTROY; then
        the slow requests still in flight are finished (their replies go
        nowhere, but a copy half-installed is not left behind).

        Waiting for the next request, the loop sleeps in a read of a
        blocking clone of /dev/fuse (`bfd`): one system call per request,
        where a non-blocking read, epoll and the read again took three.
        Measured, a bookworm boot in vctxd: 339 -> 327.5 ms, and 170 -> 160
        ms of daemon CPU (medians of 12, alternating with the epoll loop).  It sleeps in epoll
        instead while slow requests are in flight (epoll also wakes when
        one finishes), and while the kernel holds no regular file of ours:
        only a request ends that read, and stop() makes one by asking the
        kernel for such a file's pages (NOTIFY_RETRIEVE).

        After each request the loop keeps reading for spin_us before it
        sleeps: requests come in bursts (an open, an fstat, the next file),
        and one caught while spinning skips the sleep and the wake-up,
        about half a round trip (an ioctl: 10 against 19 us).  Measured: a
        warm `tar c usr` 9% faster.  Only where this is the process's one
        serving thread and there is a CPU for the caller: a thread spinning
        in Python keeps the GIL from the other mounts' threads of vctxd."""
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        os.set_blocking(self.fd, False)
        try:
            bfd = fuse_clone(self.fd)
        except OSError as e:
            log.warning("serving with epoll alone: no clone of /dev/fuse (%s)", e)
            bfd = -1
        self.bfd = bfd
        ep = select.epoll()
        ep.register(self.fd, select.EPOLLIN)
        ep.register(self.sched.wake_fd, select.EPOLLIN)
        sched = self.sched
        spin_ns, spin_until = self.spin_ns, 0
        with Session._serving_lock:
            Session._serving += 1
        try:
            while not self.destroyed and not self.stopping:
                sleep = bfd >= 0 and not spin_until and not sched.in_flight and self.file_held()
                fd = bfd if sleep else self.fd
                try:
                    data = os.read(fd, BUFSIZE)
                except BlockingIOError:
                    lone = Session._serving == 1
                    if spin_until and not sched.finished and lone and time.perf_counter_ns() < spin_until:
                        continue
                    spin_until = 0
                    if bfd >= 0 and not sched.in_flight and self.file_held():
                        continue  # to sleep in the read of bfd
                    if not sched.finished:
                        ep.poll()
                    if sched.in_flight:
                        with self.lock:
                            sched.collect()
                    continue
                except OSError as e:
                    if _gone(e):
                        break
                    continue
                self.out = fd
                if spin_ns:
                    spin_until = time.perf_counter_ns() + spin_ns
                if data[4:8] == _IOCTL_OP:
                    # No ioctl is ours to answer, and the kernel asks anyway,
                    # every time: systemd's isatty() on each line of each
                    # unit file is 3,300 of them per boot.  Answered here,
                    # before any decoding.
                    self._write(_ENOTTY_HEAD + data[8:16])
                    continue
                if data[4:8] == _RELEASE_OP and data[40:48] == _NO_FH:
                    # The close of a file opened with no handle (shared.py):
                    # nothing to do but say so.  (40: the request header.)
                    self._write(_OK_HEAD + data[8:16])
                    continue
                with self.lock:
                    self._dispatch(data)
                    if sched.finished or sched.ready:  # let slow requests make progress
                        sched.collect()
            ep.unregister(self.fd)
            while sched.in_flight:
                ep.poll()
                with self.lock:
                    sched.collect()
        finally:
            with Session._serving_lock:
                Session._serving -= 1
            ep.close()
            sched.shutdown()
            self.bfd = -1
            if bfd >= 0:
                os.close(bfd)  # (what was read from it is answered: none in flight)
            self.finished.set()

    def serve_during(self, fn: Callable[[], bool]) -> bool:
        """Run fn in a thread of its own while this one answers the requests
        it causes: a mount's set-up that needs answers (INIT, a LOOKUP).
        fn's result, or its exception.  serve() takes over afterwards."""
        out: list[bool] = []
        err: list[BaseException] = []
        r, w = os.pipe2(os.O_CLOEXEC)

        def run() -> None:
            try:
                out.append(fn())
            except BaseException as e:  # re-raised in the caller's thread
                err.append(e)
            finally:
                try:
                    os.write(w, b"!")
                except OSError:
                    pass  # the caller gave up (and closed r)
                os.close(w)

        os.set_blocking(self.fd, False)
        ep = select.epoll()
        ep.register(self.fd, select.EPOLLIN)
        ep.register(r, select.EPOLLIN)
        t = threading.Thread(target=run, name="cowfs set-up", daemon=True)
        t.start()
        try:
            done = False
            while not done:
                for fd, _ in ep.poll():
                    if fd == r:
                        done = True
                    else:
                        self._drain()
        finally:
            # Not joined if we failed: fn may wait on a request we will not
            # answer, until the caller's clean-up ends the connection.
            ep.close()
            os.close(r)
        t.join()
        if err:
            raise err[0]
        return out[0]

    def _drain(self) -> None:
        """Answer what /dev/fuse has now."""
        self.out = self.fd
        while True:
            try:
                data = os.read(self.fd, BUFSIZE)
            except BlockingIOError:
                return
            except OSError as e:
                if _gone(e):
                    return
                continue
            with self.lock:
                self._dispatch(data)

    def stop(self) -> None:
        """From another thread: make serve() return (after what is in
        flight) though the mount is still there.  Closing the /dev/fuse fd
        afterwards ends the connection: its users then get ENOTCONN."""
        self.stopping = True
        self.sched.wake()
        ino = self.file_held() if self.bfd >= 0 else 0
        if ino:
            # serve() may sleep in a read of bfd, which only a request ends:
            # the kernel answers a retrieve of a file's pages with one.  (If
            # it has let the inode go meanwhile, its FORGET is that request.)
            self.notify(NOTIFY_RETRIEVE, NOTIFY_RETRIEVE_OUT.pack(0, ino, 0, 0, 0))

    def close(self) -> None:
        """After serve() has returned."""
        self.sched.close()
