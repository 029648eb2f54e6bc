"""The guest's base root file system: Debian from its own packages, built once and cached.

``debootstrap --variant=minbase`` of bookworm with the cloud kernel (it boots
fastest under emulation), systemd as PID 1, Python 3.11 and kexec-tools,
then the few changes that make it boot from a virtio disk and keep quiet.
Everything khod-specific goes in per run (``vm/vmimage.py``); this tree
changes only when this file does: its cache key is this file's SHA-256.

Downloaded packages are kept in ``CACHE/debs`` (debootstrap's
``--cache-dir``), the tree in ``CACHE/base-KEY``. Building takes the cache's
lock exclusively; a run copying the tree takes it shared.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

SUITE = "bookworm"  # Python 3.11 (the project's floor) and kernel 6.1
PACKAGES = (
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "python3",
    "kexec-tools",
    "systemd",
    "systemd-sysv",
    "udev",
)
# The cloud kernel builds these as modules; without them in the initramfs the
# root disk is never found. MODULES=list keeps the initramfs small (~6 MB):
# it is decompressed under emulation on every boot and every kexec.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk")
# Units that would cost minutes of emulated CPU or print on the serial console.
# kexec-load would load its own kernel with plain `kexec -l` at shutdown -- the
# placement that can overwrite the reserved range (shared/reference/real-kexec.md).
MASKED = (
    "kexec-load.service",
    "getty@.service",
    "getty-static.service",
    "serial-getty@.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-pstore.service",
)

Say = Callable[[str], None]


def key() -> str:
    """The base tree's cache key: the recipe is this file."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def apt_mirror(suite: str = SUITE, roots: tuple[str, ...] = ("/etc/apt",)) -> str | None:
    """The Debian archive this machine's apt uses for ``suite`` main, or None.

    debootstrap then fetches from the same place apt does (a proxy or mirror
    set up for the machine); without one it uses its own default.
    """
    for root in roots:
        base = Path(root)
        files = sorted((base / "sources.list.d").glob("*.sources"))
        for path in files:
            for block in re.split(r"\n\s*\n", _read(path)):
                fields = _deb822(block)
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                    and "main" in fields.get("components", "").split()
                    and fields.get("enabled", "yes").lower() != "no"
                ):
                    uris = fields.get("uris", "").split()
                    if uris:
                        return uris[0]
        lists = [base / "sources.list", *sorted((base / "sources.list.d").glob("*.list"))]
        for path in lists:
            for line in _read(path).splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words:
                    return words[1]
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _deb822(block: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    last = None
    for line in block.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0] in " \t" and last:
            fields[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            last = name.strip().lower()
            fields[last] = value.strip()
    return fields


@contextlib.contextmanager
def locked(cache: Path, exclusive: bool) -> Iterator[None]:
    """The cache's lock: builders exclusive, readers shared (concurrent runs on one machine)."""
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def run(argv: list[str], log: Path, timeout: float) -> None:
    """Run a build step, its output appended to ``log``; a failure names the step and the log."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            r = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise BuildError(f"{argv[0]} took longer than {timeout:.0f} s (log: {log})") from None
    if r.returncode:
        raise BuildError(f"{' '.join(argv[:3])} ... exited {r.returncode} (log: {log})")


class BuildError(Exception):
    """A build step failed; the message names it and its log."""


def ensure(cache: Path, log: Path, say: Say) -> tuple[Path, bool]:
    """The base tree for this recipe, built if missing; (path, whether it was built now)."""
    tree = cache / f"base-{key()}"
    with locked(cache, exclusive=False):
        if (tree / ".complete").exists():
            return tree, False
    with locked(cache, exclusive=True):
        if (tree / ".complete").exists():  # another run built it while we waited
            return tree, False
        tmp = cache / f"base-{key()}.tmp"
        remove(tmp)
        build(tmp, cache / "debs", log, say)
        (tmp / ".complete").write_text(f"{SUITE} {' '.join(PACKAGES)}\n")
        remove(tree)
        tmp.rename(tree)
        for old in cache.glob("base-*"):  # a base of an older recipe is never used again
            if old != tree:
                remove(old)
    return tree, True


def remove(tree: Path) -> None:
    """Remove a (partial) tree; first unmount what an interrupted debootstrap left mounted in it."""
    if not tree.exists():
        return
    prefix = str(tree.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, stdin=subprocess.DEVNULL)
    shutil.rmtree(tree, ignore_errors=True)


def build(root: Path, debs: Path, log: Path, say: Say) -> None:
    """debootstrap, then the changes the guest needs."""
    debs.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    say(f"debootstrap {SUITE} ({len(PACKAGES)} packages and their dependencies) from {mirror}")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--cache-dir={debs}",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(root),
    ]
    run([*argv, mirror] if mirror else argv, log, timeout=1200)
    etc = root / "etc"
    with open(etc / "initramfs-tools" / "modules", "a") as f:
        f.write("".join(m + "\n" for m in INITRAMFS_MODULES))
    conf = etc / "initramfs-tools" / "initramfs.conf"
    conf.write_text(re.sub(r"(?m)^MODULES=.*$", "MODULES=list", conf.read_text()))
    run(["chroot", str(root), "update-initramfs", "-u", "-k", "all"], log, timeout=600)
    kexec_defaults = etc / "default" / "kexec"
    kexec_defaults.write_text(
        re.sub(r"(?m)^LOAD_KEXEC=.*$", "LOAD_KEXEC=false", kexec_defaults.read_text())
    )
    units = etc / "systemd" / "system"
    for wants in units.glob("*.wants"):
        for link in wants.iterdir():
            if link.name in MASKED or link.name.replace("@tty1", "@") in MASKED:
                link.unlink()
    for name in MASKED:
        target = units / name
        target.unlink(missing_ok=True)
        target.symlink_to("/dev/null")
    (etc / "hostname").write_text("khod-vm\n")
    (etc / "fstab").write_text(
        "# the root file system is mounted by the initramfs (root=/dev/vda rw)\n"
    )
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()  # copies of CACHE/debs: the image need not carry them
