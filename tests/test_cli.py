"""Bad input: one clear line, a distinct exit code, nothing created."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import COWFS, Guest, cowfs


def fails(code: int, *args: str, says: str) -> None:
    res = cowfs(*args, check=False)
    assert res.returncode == code, (res.returncode, res.stderr)
    assert says in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_mount_bad_backing(tmp_path: Path, template: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fails(10, "mount", str(tmp_path / "missing"), str(mnt), says="does not exist")
    (tmp_path / "file").write_text("x")
    fails(10, "mount", str(tmp_path / "file"), str(mnt), says="is not a directory")
    assert os.listdir(mnt) == []


def test_mount_bad_mountpoint(tmp_path: Path, template: Path) -> None:
    fails(11, "mount", str(template), str(tmp_path / "nowhere"), says="does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    fails(11, "mount", str(template), str(full), says="not empty")
    fails(11, "mount", str(template), str(template / "var/empty"), says="inside the backing tree")
    assert not (tmp_path / "nowhere").exists()


def test_mount_already_mounted(guest: Guest, template: Path) -> None:
    fails(11, "mount", str(template), str(guest.mnt), says="already a mount point")


def test_no_dev_fuse(tmp_path: Path, template: Path) -> None:
    """In a private mount namespace with /dev/fuse hidden, mount says so."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"mount -t tmpfs none /dev && exec {' '.join(COWFS)} mount {template} {mnt}"
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert res.returncode == 12, res.stderr
    assert "/dev/fuse is missing" in res.stderr


def test_umount_errors(guest: Guest, tmp_path: Path) -> None:
    fails(15, "umount", str(tmp_path), says="is not a cowfs mount")
    with open(guest.mnt / "etc/hostname"):
        fails(14, "umount", str(guest.mnt), says="--lazy")
    cowfs("umount", str(guest.mnt))
    assert not os.path.ismount(guest.mnt)


def test_umount_lazy_detaches_a_busy_mount(guest: Guest) -> None:
    f = open(guest.mnt / "etc/hostname")  # noqa: SIM115 - held open across the unmount
    cowfs("umount", "--lazy", str(guest.mnt))
    assert not os.path.ismount(guest.mnt)
    assert f.read() == "template\n"
    f.close()


def test_clone_errors(tmp_path: Path, template: Path, mount_guest: Callable[..., Guest]) -> None:
    fails(17, "clone", str(tmp_path / "missing"), str(tmp_path / "d"), says="does not exist")
    fails(17, "clone", str(template), str(template), says="already exists")
    fails(17, "clone", str(template), str(tmp_path / "no/such/dir"), says="does not exist")
    fails(17, "clone", str(template), "/dev/shm/cowfs-test-clone", says="another filesystem")
    assert not os.path.exists("/dev/shm/cowfs-test-clone")
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_clone_is_faithful(tmp_path: Path, template: Path) -> None:
    dest = tmp_path / "clone"
    out = cowfs("clone", "--json", str(template), str(dest)).stdout
    assert '"files": 6' in out
    for rel in ("etc/hostname", "bin/true", "usr/share/doc/README.hardlink"):
        assert (dest / rel).stat().st_ino == (template / rel).stat().st_ino
    for rel in ("var/fifo", "bin/lib-link", "usr/share/doc", "etc"):
        a, b = (template / rel).lstat(), (dest / rel).lstat()
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) == (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns)
        assert a.st_ino != b.st_ino
    assert os.readlink(dest / "bin/lib-link") == "../usr/lib/libdemo.so"


def test_attr_on_missing_path(tmp_path: Path, template: Path) -> None:
    fails(17, "attr", "show", str(tmp_path / "missing"), says="does not exist")
    fails(2, "attr", "set", str(template / "etc/hostname"), says="--iunlink")
