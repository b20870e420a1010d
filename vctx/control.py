"""Asking vctxd (daemon.py): one JSON line each way per connection.

A client that finds no daemon starts one and asks again; one that finds a
daemon on its way out (idle, it closes its socket first) does the same.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from . import errors

# monitor.RUN, spelt out: `vctx boot` imports this module and little else
SOCK = os.path.join(os.environ.get("VCTX_RUN", "/run/vctx"), "vctxd.sock")
BUSY = 75  # daemon.BUSY: another vctxd holds the lock


def _start(deadline: float) -> None:
    import subprocess

    while True:
        res = subprocess.run(
            [sys.executable, "-m", "vctx.daemon"], stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if res.returncode == 0:
            return
        if res.returncode != BUSY:
            raise errors.VctxError(res.stderr.strip() or "vctxd did not start")
        # Another vctxd is starting (then we connect to it) or exiting
        # (then the lock is free a moment later).
        if time.monotonic() > deadline:
            raise errors.VctxError("vctxd: another daemon holds the lock but does not answer")
        time.sleep(0.02)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(SOCK)
            return
        except OSError:
            continue


def request(msg: dict[str, Any], timeout: float = 60.0, start: bool = True) -> dict[str, Any] | None:
    """The daemon's reply; None if there is no daemon and start is False.
    An error reply is raised as VctxError with its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(SOCK)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if not start:
                return None
            _start(deadline)
            continue
        with s:
            s.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                s.sendall(json.dumps(msg).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except TimeoutError:
                raise errors.VctxError(f"vctxd did not answer within {timeout:.0f}s") from None
            except OSError:
                data = b""
        if not data:  # it went away under us: it was exiting
            if not start:
                return None
            if time.monotonic() > deadline:
                raise errors.VctxError("vctxd went away")
            continue
        reply: dict[str, Any] = json.loads(data)
        if "error" in reply:
            err = errors.VctxError(str(reply["error"]))
            err.exit_code = int(reply.get("code", 1))
            raise err
        return reply
