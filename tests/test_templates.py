"""vctx templates and guests on disk: build, import, create, delete."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import cowfs, fails, require, vctx

from vctx import idrange
from vctx.home import Home

MARK = "trusted.cowfs.iunlink"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    require(os.geteuid() == 0, "needs root (chown, trusted.* xattrs, chroot)")
    return tmp_path / "home"


@pytest.fixture
def busybox(home: Path) -> Path:
    require(Path("/bin/busybox").is_file(), "needs busybox-static")
    vctx(home, "template", "build", "bb", "--from", "busybox")
    return home / "templates/bb/rootfs"


def all_marked(root: Path) -> bool:
    regular = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return bool(regular) and all(MARK in os.listxattr(p) for p in regular)


def test_busybox_template(home: Path, busybox: Path) -> None:
    info = json.loads(vctx(home, "template", "show", "bb", "--json").stdout)
    assert info["init"] == "busybox" and info["source"] == "busybox" and info["guests"] == []
    assert all_marked(busybox)
    out = subprocess.run(
        ["chroot", str(busybox), "/bin/sh", "-c", "echo $((6*7)); ls /sbin/init"], capture_output=True, text=True
    )
    assert out.stdout.split() == ["42", "/sbin/init"]
    assert json.loads(vctx(home, "template", "list", "--json").stdout)[0]["name"] == "bb"
    assert "bb" in vctx(home, "template", "list").stdout
    assert "exists" in fails(home, 22, "template", "build", "bb", "--from", "busybox")
    assert not [p for p in (home / "templates").iterdir() if p.name.startswith(".")]


def test_guest_create_and_delete(home: Path, busybox: Path) -> None:
    before = (busybox / "etc/hostname").read_text()
    vctx(home, "create", "web1", "--template", "bb")
    vctx(home, "create", "web2", "-t", "bb", "--hostname", "www")
    g1, g2 = home / "guests/web1", home / "guests/web2"
    assert (g1 / "rootfs/etc/hostname").read_text() == "web1\n"
    assert (g2 / "rootfs/etc/hostname").read_text() == "www\n"
    assert (busybox / "etc/hostname").read_text() == before  # the template's inode untouched
    assert (g1 / "rootfs/bin/busybox").stat().st_ino == (busybox / "bin/busybox").stat().st_ino
    cfg1, cfg2 = ((g / "guest.toml").read_text() for g in (g1, g2))
    assert 'template = "bb"' in cfg1 and "version = 1" in cfg1 and 'init = "busybox"' in cfg1
    base = [int(line.split("=")[1]) for c in (cfg1, cfg2) for line in c.splitlines() if line.startswith("id_base")]
    assert base[0] != base[1] and abs(base[0] - base[1]) >= 65536

    assert "used by web1, web2" in fails(home, 23, "template", "delete", "bb")
    assert "exists" in fails(home, 22, "create", "web1", "-t", "bb")
    assert "bad guest name" in fails(home, 20, "create", "Web1", "-t", "bb")
    assert "bad guest name" in fails(home, 20, "create", "a" * 64, "-t", "bb")
    assert "no template" in fails(home, 21, "create", "web3", "-t", "nope")
    assert "no guest" in fails(home, 21, "delete", "web9")

    # a running guest (its tree served by cowfs) cannot be deleted
    mnt = home / "mnt"
    mnt.mkdir()
    cowfs("mount", str(g1 / "rootfs"), str(mnt))
    try:
        assert "is running" in fails(home, 26, "delete", "web1")
    finally:
        cowfs("umount", str(mnt))
    vctx(home, "delete", "web1")
    assert not g1.exists()
    vctx(home, "create", "web3", "-t", "bb")  # gets web1's freed range back
    assert f"id_base = {base[0]}" in (home / "guests/web3/guest.toml").read_text()

    # a guest keeps working without its template: its files are links, not references
    vctx(home, "template", "delete", "--force", "bb")
    assert not (home / "templates/bb").exists()
    out = subprocess.run(
        ["chroot", str(g2 / "rootfs"), "/bin/sh", "-c", "hostname -F /etc/hostname; cat /etc/hostname"],
        capture_output=True,
        text=True,
    )
    assert out.stdout == "www\n"


def test_bad_config_is_one_line(home: Path, busybox: Path) -> None:
    vctx(home, "create", "web1", "-t", "bb")
    cfg = home / "guests/web1/guest.toml"
    text = cfg.read_text()
    cfg.write_text(text + "\nmemroy = '1G'\n")
    assert "unknown key 'memroy'" in fails(home, 25, "delete", "web1")
    cfg.write_text(text.replace("[limits]", "[limits]\nmemory = 'lots'"))
    assert "limits.memory" in fails(home, 25, "delete", "web1")
    cfg.write_text(text.replace("version = 1", "version = 9"))
    assert "version 9" in fails(home, 25, "delete", "web1")
    cfg.write_text("version = [")
    assert "guest.toml" in fails(home, 25, "delete", "web1")


def test_id_ranges_avoid_subuid_and_are_reused(tmp_path: Path) -> None:
    home = Home(str(tmp_path / "home"))
    home.ensure()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "subuid").write_text(f"alice:{idrange.FIRST}:65536\nbob:{idrange.FIRST + 100_000}:10\n")
    (etc / "subgid").write_text("")
    first = idrange.allocate(home, etc)
    assert first == idrange.FIRST + 2 * idrange.SIZE  # past alice's and bob's
    assert first % idrange.SIZE == 0


def test_import_dir_keeps_everything(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin/tool").write_bytes(b"\x7fELF fake" * 10)
    os.chown(src / "bin/tool", 0, 50)
    os.chmod(src / "bin/tool", 0o4755)
    os.link(src / "bin/tool", src / "bin/tool2")
    os.setxattr(src / "bin/tool", "user.origin", b"dir")
    os.symlink("tool", src / "bin/link")
    os.mknod(src / "bin/null", 0o20666, os.makedev(1, 3))
    os.utime(src / "bin/tool", ns=(5, 123_456_789))
    vctx(home, "template", "build", "imp", "--from-dir", str(src))
    t = home / "templates/imp/rootfs/bin"
    st = (t / "tool").lstat()
    assert (st.st_mode & 0o7777, st.st_gid, st.st_mtime_ns) == (0o4755, 50, 123_456_789)
    assert st.st_ino == (t / "tool2").lstat().st_ino
    assert os.getxattr(t / "tool", "user.origin") == b"dir"
    assert os.readlink(t / "link") == "tool" and (t / "null").lstat().st_rdev == os.makedev(1, 3)
    assert MARK in os.listxattr(t / "tool")
    assert "not a directory" in fails(home, 21, "template", "build", "imp2", "--from-dir", str(tmp_path / "nope"))


def test_import_tar_cannot_escape(home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes | None = None, **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(ti, k, v)
            if data is None:
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))

        add("etc", type=tarfile.DIRTYPE, mode=0o755)
        add("etc/hostname", b"tarred\n", mode=0o644, uid=0, gid=0, pax_headers={"SCHILY.xattr.user.k": "v"})
        add("escape", type=tarfile.SYMTYPE, linkname=str(outside))
        add("escape/pwned", b"gotcha\n", mode=0o644)
        add("../dotdot", b"gotcha\n", mode=0o644)
    tar = tmp_path / "root.tar"
    tar.write_bytes(buf.getvalue())
    res = vctx(home, "template", "build", "tt", "--from-tar", str(tar), check=False)
    # The hostile members resolve inside the new tree (chroot) or fail there: never outside.
    assert not list(outside.iterdir()) and not (home / "templates/dotdot").exists()
    assert res.returncode == 24 and "cannot unpack" in res.stderr
    assert not (home / "templates/tt").exists() and not list((home / "templates").iterdir())

    good = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as bad:
        members = bad.getmembers()[:3]
    with tarfile.open(fileobj=good, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            m.linkname = "/etc" if m.issym() else m.linkname
            tf.addfile(m, io.BytesIO(b"tarred\n") if m.isfile() else None)
    tar.write_bytes(gzip.compress(good.getvalue()))  # compressed, as rootfs tarballs come
    vctx(home, "template", "build", "tt", "--from-tar", str(tar))
    root = home / "templates/tt/rootfs"
    assert (root / "etc/hostname").read_text() == "tarred\n"
    assert os.getxattr(root / "etc/hostname", "user.k") == b"v"
    assert os.readlink(root / "escape") == "/etc"
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    assert "cannot unpack" in fails(home, 24, "template", "build", "tj", "--from-tar", str(tmp_path / "junk.tar"))
    assert not (home / "templates/tj").exists()
    assert "exactly one" in fails(home, 2, "template", "build", "x", "--from", "busybox", "--from-tar", str(tar))


def test_debian_template_boots_unmodified(debian_home: Path) -> None:
    root = debian_home / "templates/deb/rootfs"
    info = json.loads(vctx(debian_home, "template", "show", "deb", "--json").stdout)
    assert info["init"] == "systemd" and info["source"] == "debian bookworm (systemd)"
    assert "systemd" in os.readlink(root / "sbin/init")
    assert (root / "etc/hostname").read_text() == "localhost\n"
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "etc/shadow").read_text().startswith("root:*:")  # no password until the admin sets one
    assert all_marked(root / "usr/bin")
    vctx(debian_home, "create", "d1", "-t", "deb")
    g = debian_home / "guests/d1/rootfs"
    assert len((g / "etc/machine-id").read_text().strip()) == 32
    assert (root / "etc/machine-id").read_text() == ""
    out = subprocess.run(["chroot", str(g), "dpkg-query", "-W", "systemd-sysv"], capture_output=True, text=True)
    assert out.stdout.startswith("systemd-sysv")
