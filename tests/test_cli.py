"""Bad input: one clear line, a distinct exit code, nothing created."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import COWFS, Guest, cowfs, require


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


def test_a_user_mounts_through_fusermount3(tmp_path: Path, template: Path) -> None:
    """Not root: the mount goes through fusermount3, the daemon runs as the
    user and records itself in a directory of the user's own."""
    require(shutil.which("fusermount3") is not None, "needs fusermount3 (Debian's fuse3)")
    work = tmp_path / "user"
    (work / "dev").mkdir(parents=True)
    work.chmod(0o777)
    # The user runs this checkout's interpreter and package: its directories
    # must be reachable (a CI checkout may sit in a 0700 temporary directory).
    opened = [p for p in Path(__file__).resolve().parents if not p.stat().st_mode & 0o001]
    for p in opened:
        p.chmod(p.stat().st_mode | 0o001)
    # /dev/fuse is 0666 where udev makes it; where it is not (this host), a
    # private mount namespace gets a node that is.
    as_user = f"cd {work} && mkdir -p b/etc m && echo hi > b/etc/x && {' '.join(COWFS)} mount b m && cat m/etc/x && echo new > m/etc/y && ls -ln b/etc && ls -ld $STATE && {' '.join(COWFS)} umount m && ! grep -q ' {work}/m ' /proc/self/mountinfo && echo ALL-OK"
    script = (
        f"mount -t tmpfs none {work}/dev && mknod -m 0666 {work}/dev/fuse c 10 229 && "
        f"mount --bind {work}/dev/fuse /dev/fuse && "
        f"exec setpriv --reuid=65534 --regid=65534 --clear-groups env -u XDG_RUNTIME_DIR STATE=/tmp/cowfs-65534 sh -c {shlex.quote(as_user)}"
    )
    try:
        res = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True
        )
    finally:
        for p in opened:
            p.chmod(p.stat().st_mode & ~0o001)
    assert res.returncode == 0 and res.stdout.strip().endswith("ALL-OK"), (res.stdout, res.stderr)
    assert "hi" in res.stdout.splitlines()
    assert " 65534 65534 " in res.stdout  # files the user made through the mount are the user's
    assert "drwx------" in res.stdout  # the state directory is the user's alone


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
