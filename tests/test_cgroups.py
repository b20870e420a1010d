"""The cgroup layer against fake cgroupfs trees: pure v2 (most hosts) and hybrid.

The real hybrid layout of this machine is exercised by test_guests.py; here
the v2 paths are checked file by file, as the kernel would receive them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vctx import errors
from vctx.cgroups import GuestCgroups, detect
from vctx.config import Limits


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory pids", swap: bool = True) -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.procs").write_text("")
    (root / "vctx").mkdir()
    if swap:
        (root / "vctx" / "memory.swap.max").write_text("max\n")
    return root


def read(p: Path) -> str:
    return p.read_text().strip()


def test_pure_v2_limits(tmp_path: Path) -> None:
    base = fake_v2(tmp_path / "cg")
    lay = detect(base)
    assert lay.pure_v2 and lay.v2 == base and "memory" in lay.v2_controllers
    cg = GuestCgroups("web", lay)
    cg.create(
        Limits(memory="512M", swap="1G", cpus=1.5, cpu_weight=200, cpuset="0-1", pids=100, io_weight=300), owner=100000
    )
    node = base / "vctx" / "web"
    assert read(base / "cgroup.subtree_control") == "+memory +cpu +cpuset +pids +io"
    assert read(base / "vctx" / "cgroup.subtree_control") == "+memory +cpu +cpuset +pids +io"
    assert read(node / "memory.max") == str(512 << 20)
    assert read(node / "memory.swap.max") == str(1 << 30)
    assert read(node / "cpu.max") == "150000 100000"
    assert read(node / "cpu.weight") == "200"
    assert read(node / "cpuset.cpus") == "0-1"
    assert read(node / "pids.max") == "100"
    assert read(node / "io.weight") == "default 300"
    assert node.stat().st_uid == 100000  # delegated to the guest's root
    cg.add(4242)
    assert read(node / "cgroup.procs") == "4242"
    (node / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert cg.populated() and cg.pids() == [4242]
    (node / "cpu.stat").write_text("usage_usec 300\nuser_usec 200\nsystem_usec 100\n")
    (node / "memory.current").write_text("1234\n")
    (node / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    (node / "pids.current").write_text("3\n")
    (node / "pids.events").write_text("max 2\n")
    assert cg.stats() == {
        "usage_usec": 300,
        "user_usec": 200,
        "system_usec": 100,
        "memory": 1234,
        "memory_max": 7,
        "memory_oom_kill": 1,
        "pids": 3,
        "pids_hits": 2,
    }
    (node / "cgroup.kill").write_text("")
    cg.kill()
    assert read(node / "cgroup.kill") == "1"


def test_v2_refuses_what_the_host_lacks(tmp_path: Path) -> None:
    base = fake_v2(tmp_path / "cg", controllers="cpu pids", swap=False)
    cg = GuestCgroups("web", detect(base))
    with pytest.raises(errors.HostLacks, match="no memory cgroup controller"):
        cg.create(Limits(memory="1G"))
    assert not (base / "vctx" / "web").exists()  # nothing made
    base2 = fake_v2(tmp_path / "cg2", swap=False)
    with pytest.raises(errors.HostLacks, match="cannot limit swap"):
        GuestCgroups("web", detect(base2)).create(Limits(memory="1G", swap="1G"))
    cg.create(Limits(pids=5, cpus=0.5))
    assert read(base / "vctx" / "cgroup.subtree_control") == "+cpu +pids"


def test_hybrid_layout(tmp_path: Path) -> None:
    base = tmp_path / "cg"
    for c in ("memory", "cpu,cpuacct", "pids", "cpuset", "unified"):
        (base / c).mkdir(parents=True)
        (base / c / "cgroup.procs").write_text("")
    (base / "cpu").symlink_to("cpu,cpuacct")
    (base / "cpuacct").symlink_to("cpu,cpuacct")
    (base / "unified" / "cgroup.controllers").write_text("")
    for f in ("cpuset.cpus", "cpuset.mems"):
        (base / "cpuset" / f).write_text("0-1\n")
    lay = detect(base)
    assert (
        not lay.pure_v2 and lay.v2 == base / "unified" and set(lay.v1) == {"memory", "cpu", "cpuacct", "pids", "cpuset"}
    )
    cg = GuestCgroups("web", lay)
    cg.create(Limits(memory="64M", cpus=2, cpu_weight=50, pids=10))
    assert read(base / "memory/vctx/web/memory.limit_in_bytes") == str(64 << 20)
    assert read(base / "cpu/vctx/web/cpu.cfs_quota_us") == "200000"
    assert read(base / "cpu/vctx/web/cpu.shares") == "512"
    assert read(base / "pids/vctx/web/pids.max") == "10"
    assert read(base / "cpuset/vctx/web/cpuset.cpus") == "0-1"  # v1 cpusets start empty: filled from the parent
    assert (base / "unified/vctx/web").is_dir()
    with pytest.raises(errors.HostLacks, match="swap limit needs a memory limit"):
        (base / "memory/vctx/memory.memsw.limit_in_bytes").write_text("0")
        GuestCgroups("other", lay).create(Limits(swap="1G"))
    # cpu and cpuacct are one hierarchy: one node for both
    assert sorted(str(p.relative_to(base)) for p in cg.nodes()) == [
        "cpu/vctx/web",
        "cpuset/vctx/web",
        "memory/vctx/web",
        "pids/vctx/web",
        "unified/vctx/web",
    ]
