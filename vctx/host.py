"""Facts about the host that guests depend on."""

from __future__ import annotations

import os


def _cgroup_layout() -> str:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2 (unified at /sys/fs/cgroup)"
    if os.path.exists("/sys/fs/cgroup/unified/cgroup.controllers"):
        return "hybrid (v1 controllers, v2 at /sys/fs/cgroup/unified)"
    return "v1"


def probe() -> dict[str, str]:
    return {
        "kernel": os.uname().release,
        "fuse": "yes" if os.path.exists("/dev/fuse") else "no (/dev/fuse missing)",
        "cgroups": _cgroup_layout(),
        "user namespaces": "yes" if os.path.exists("/proc/self/ns/user") else "no",
    }
