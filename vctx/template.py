"""Templates: the shared trees guests are cloned from.

A template is built (busybox, debootstrap) or imported (a tarball, a
directory) under a partial name and renamed into place when complete, so a
name in templates/ is always a finished template.  Its regular files are
marked immutable-but-unlinkable as the last step: from then on a guest can
only ever replace them with private copies.
"""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import stat
import subprocess
import tarfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from cowfs import attr as cowfs_attr

from . import errors
from .files import write_atomic
from .home import Home

BUSYBOX = Path("/bin/busybox")
SUITES = ("bookworm", "trixie")
MIRROR = "http://deb.debian.org/debian"
Status = Callable[[str], None]


@dataclass
class Template:
    name: str
    path: Path
    source: str
    init: str
    created: str
    files: int = 0
    size: int = 0

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "rootfs": str(self.rootfs),
            "source": self.source,
            "init": self.init,
            "created": self.created,
            "files": self.files,
            "bytes": self.size,
        }


def detect_init(root: Path) -> str:
    """Which init the tree boots with: systemd, sysvinit, busybox or plain."""
    init = root / "sbin/init"
    if not init.is_symlink() and not init.exists():
        init = root / "usr/sbin/init"
    if init.is_symlink():
        target = os.readlink(init)
        if "systemd" in target:
            return "systemd"
        if target.endswith("busybox"):
            return "busybox"
    elif init.is_file():
        # sysvinit-core ships a real /sbin/init; a copied busybox is busybox
        head = init.read_bytes()[: 1 << 20]
        return "busybox" if b"BusyBox" in head else "sysvinit"
    return "plain"


# --- builders: each fills an empty directory --------------------------------------


def build_busybox(root: Path, status: Status) -> None:
    """A tiny guest from Debian's busybox-static: one binary, its applets, an inittab."""
    if not BUSYBOX.is_file():
        raise errors.HostLacks(f"{BUSYBOX} is missing: apt install busybox-static")
    status("copying busybox")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/init.d", "dev", "proc", "sys", "run", "var/log", "home"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "root").mkdir(mode=0o700)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        link = root / a
        if a == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath("/bin/busybox", "/" + os.path.dirname(a)), link)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/shadow": "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
        "etc/hostname": "localhost\n",
        "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
        # busybox init: rcS at boot, a shell on the console, clean halt and reboot
        "etc/inittab": (
            "::sysinit:/etc/init.d/rcS\nconsole::respawn:-/bin/sh\n::ctrlaltdel:/sbin/reboot\n::shutdown:/bin/sync\n"
        ),
        "etc/init.d/rcS": "#!/bin/sh\n[ -r /etc/hostname ] && hostname -F /etc/hostname\nexit 0\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/init.d/rcS").chmod(0o755)


def build_debian(
    root: Path,
    status: Status,
    suite: str,
    init: str,
    include: list[str],
    mirror: str,
    cache_dir: Path | None,
) -> None:
    """debootstrap minbase plus an init, a tree that boots unmodified."""
    if shutil.which("debootstrap") is None:
        raise errors.HostLacks("debootstrap is missing: apt install debootstrap")
    if suite not in SUITES:
        raise errors.UsageError(f"suite must be one of {', '.join(SUITES)}")
    init_pkg = {"systemd": "systemd-sysv", "sysvinit": "sysvinit-core"}.get(init)
    if init_pkg is None:
        raise errors.UsageError("--init must be systemd or sysvinit for a Debian template")
    pkgs = [init_pkg, *include]
    if init == "sysvinit":
        pkgs.append("orphan-sysvinit-scripts")
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(pkgs)}"]
    if init == "sysvinit":
        cmd.append("--exclude=systemd-sysv")
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--cache-dir={cache_dir}")
    cmd += [suite, str(root), mirror]
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        assert p.stdout is not None
        for line in p.stdout:
            line = line.rstrip()
            tail = [*tail[-20:], line]
            if line.startswith(("I: ", "E: ", "W: ")):
                status(line[3:])
    if p.returncode != 0:
        errs = [line for line in tail if line.startswith("E: ")] or tail[-1:] or ["no output"]
        raise errors.BuildFailed(f"debootstrap {suite} failed: {errs[-1].removeprefix('E: ')}")
    # A hostname placeholder (boot sets the guest's own); apt caches are not the template's business.
    (root / "etc/hostname").write_text("localhost\n")
    for rel in ("var/cache/apt/archives", "var/lib/apt/lists"):
        d = root / rel
        for p2 in d.glob("*"):
            if p2.is_file() and not p2.is_symlink() and p2.name != "lock":
                p2.unlink()
    # Each guest gets its own machine-id at create; the template has none.
    mid = root / "etc/machine-id"
    if mid.exists() or mid.is_symlink():
        mid.unlink()
        mid.write_text("")


def import_tar(root: Path, status: Status, tar_path: Path) -> None:
    """Unpack a rootfs tarball, chrooted into the new tree.

    The archive is untrusted: a member could be a symlink to /etc followed by
    a file "through" it.  Extracting inside chroot(root) makes every path and
    every link resolve within the new tree, whatever the archive holds.
    """
    try:
        src = open(tar_path, "rb")  # noqa: SIM115 - handed to the child
    except OSError as e:
        raise errors.NotFound(f"cannot read {tar_path}: {e.strerror}") from None
    status(f"unpacking {tar_path.name}")
    # Inside the chroot nothing can be imported: load the decompressors now.
    import bz2, gzip, lzma  # noqa: F401, E401, I001

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: chroot, extract, report one line, exit
        os.close(r)
        code = 0
        try:
            os.chroot(root)
            os.chdir("/")
            # The chroot is the safety; Pythons without extraction filters
            # (3.11 before 3.11.4) have no "fully_trusted" to ask for.
            trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
            with tarfile.open(fileobj=src, mode="r:*") as tf:
                for m in tf:
                    tf.extract(m, "/", numeric_owner=True, **trusted)  # type: ignore[arg-type]
                    for k, v in m.pax_headers.items():
                        if k.startswith("SCHILY.xattr."):
                            os.setxattr(
                                "/" + m.name.lstrip("/"),
                                k.removeprefix("SCHILY.xattr."),
                                v.encode("utf-8", "surrogateescape"),
                                follow_symlinks=False,
                            )
        except tarfile.ReadError:
            os.write(w, b"not a tar archive (plain, gzip, bzip2 or xz)")
            code = 1
        except BaseException as e:
            os.write(w, f"{type(e).__name__}: {e}".splitlines()[0].encode()[:1000])
            code = 1
        os._exit(code)
    os.close(w)
    src.close()
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode(errors="replace")
    _, st = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(st) != 0:
        raise errors.BuildFailed(f"cannot unpack {tar_path}: {msg or 'the extractor died'}")


def import_dir(root: Path, status: Status, src: Path) -> None:
    """Copy a directory with everything: owners, modes, times, xattrs, ACLs, caps."""
    if not src.is_dir():
        raise errors.NotFound(f"{src} is not a directory")
    status(f"copying {src}")
    # GNU cp -a is the tool that preserves all of it, hard links included;
    # reflinks make it nearly free where the filesystem can.
    res = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", f"{src}/.", str(root)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise errors.BuildFailed(
            f"cannot copy {src}: {res.stderr.strip().splitlines()[-1] if res.stderr else 'cp failed'}"
        )


# --- the catalogue -----------------------------------------------------------------


def _meta_path(path: Path) -> Path:
    return path / "template.toml"


def load(home: Home, name: str) -> Template:
    path = home.template(name)
    try:
        meta = tomllib.loads(_meta_path(path).read_text())
    except FileNotFoundError:
        raise errors.NotFound(f"no template {name!r} (see vctx template list)") from None
    except tomllib.TOMLDecodeError as e:
        raise errors.BadConfig(f"{_meta_path(path)}: {e}") from None
    return Template(
        name=name,
        path=path,
        source=str(meta.get("source", "?")),
        init=str(meta.get("init", "plain")),
        created=str(meta.get("created", "")),
        files=int(meta.get("files", 0)),
        size=int(meta.get("bytes", 0)),
    )


def list_all(home: Home) -> list[Template]:
    return [load(home, n) for n in home.names(home.templates) if _meta_path(home.templates / n).exists()]


def _measure(root: Path) -> tuple[int, int]:
    files = size = 0
    for top, _, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(top, n))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


def build(home: Home, name: str, source: str, builder: Callable[[Path], None], status: Status) -> Template:
    """Run builder on a fresh partial tree, mark it, describe it, rename it in."""
    home.ensure()
    path = home.template(name)
    if path.exists():
        raise errors.Exists(f"template {name!r} exists (vctx template delete {name} first)")
    partial = home.templates / f".{name}.partial-{secrets.token_hex(4)}"
    partial.mkdir(mode=0o700)
    try:
        root = partial / "rootfs"
        root.mkdir(mode=0o755)
        builder(root)
        init = detect_init(root)
        status("marking files immutable-but-unlinkable")
        cowfs_attr.change([str(root)], recursive=True, on=True)
        files, size = _measure(root)
        meta = {
            "version": 1,
            "source": source,
            "init": init,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "files": files,
            "bytes": size,
        }
        write_atomic(_meta_path(partial), tomli_w.dumps(meta).encode())
        with home.locked():
            if path.exists():
                raise errors.Exists(f"template {name!r} appeared while it was being built")
            partial.rename(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return load(home, name)


def users(home: Home, name: str) -> list[str]:
    """Guests whose config names this template."""
    out = []
    for g in home.names(home.guests):
        cfg = home.guests / g / "guest.toml"
        try:
            if tomllib.loads(cfg.read_text()).get("template") == name:
                out.append(g)
        except (OSError, tomllib.TOMLDecodeError):
            continue
    return out


def delete(home: Home, name: str, force: bool) -> None:
    t = load(home, name)
    with home.locked():
        deps = users(home, name)
        if deps and not force:
            more = f" and {len(deps) - 3} more" if len(deps) > 3 else ""
            raise errors.InUse(f"template {name!r} is used by {', '.join(deps[:3])}{more} (--force to delete anyway)")
        # Guests keep working without it: their files are hard links, not references.
        gone = home.templates / f".{name}.deleting-{secrets.token_hex(4)}"
        t.path.rename(gone)
    shutil.rmtree(gone)
