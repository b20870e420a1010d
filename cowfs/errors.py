"""User-facing errors: one clear line and a distinct exit code each."""

from __future__ import annotations


class CowfsError(Exception):
    """An error the user caused or can fix; printed without a traceback."""

    exit_code = 1


class UsageError(CowfsError):
    exit_code = 2


class BadBacking(CowfsError):
    exit_code = 10


class BadMountpoint(CowfsError):
    exit_code = 11


class NoFuse(CowfsError):
    exit_code = 12


class NotPermitted(CowfsError):
    exit_code = 13


class Busy(CowfsError):
    exit_code = 14


class NotMounted(CowfsError):
    exit_code = 15


class DaemonFailed(CowfsError):
    exit_code = 16


class BadTree(CowfsError):
    exit_code = 17


def os_error_line(e: OSError) -> str:
    """An OSError as the one line a user sees: what failed, and on what."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"
