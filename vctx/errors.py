"""User-facing errors: one clear line and a distinct exit code each.

3 is not an error code here: `vctx status` exits 3 for a stopped guest, as
LSB init scripts do.
"""

from __future__ import annotations


class VctxError(Exception):
    """An error the user caused or can fix; printed without a traceback."""

    exit_code = 1


class UsageError(VctxError):
    exit_code = 2


class BadName(VctxError):
    exit_code = 20


class NotFound(VctxError):
    exit_code = 21


class Exists(VctxError):
    exit_code = 22


class InUse(VctxError):
    exit_code = 23


class BuildFailed(VctxError):
    exit_code = 24


class BadConfig(VctxError):
    exit_code = 25


class Running(VctxError):
    exit_code = 26


class NotRunning(VctxError):
    exit_code = 27


class NoIds(VctxError):
    exit_code = 28


class HostLacks(VctxError):
    exit_code = 29
