"""The guest image of ``make vm-test``: the cached base plus khod from this checkout.

Per run (seconds, not minutes): a wheel of this checkout, installed with its
dependencies for the guest's CPython 3.11 from binary wheels (cached in
``CACHE/wheels``, downloaded only when a requirement is missing there); a
copy of the base tree; then the deployment the README documents -- the unit
files of ``systemd/`` with the ``devmem`` drop-in, sysusers and tmpfiles
snippets, ``config/khod.toml`` set to ``backend = "devmem"`` on the reserved
range -- plus the two example workloads as services of their own and the
guest driver (``vm/guest/``). ``mkfs.ext4 -d`` turns the tree into a disk
image without loop mounts; QEMU boots it with ``snapshot=on``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm import base

GUEST = Path(__file__).resolve().parent / "guest"
PYTHON = "3.11"  # bookworm's python3
SITE = f"usr/local/lib/python{PYTHON}/dist-packages"  # on the guest's default sys.path
# bookworm has glibc 2.36: every manylinux tag up to it fits (pip does not expand one
# --platform into the older ones, so each is listed)
GLIBC_MINOR = 36
WHEEL_TARGET = [
    *(
        arg
        for tag in (
            "manylinux2014_x86_64",
            *(f"manylinux_2_{minor}_x86_64" for minor in range(17, GLIBC_MINOR + 1)),
        )
        for arg in ("--platform", tag)
    ),
    "--python-version",
    PYTHON,
    "--implementation",
    "cp",
    "--abi",
    f"cp{PYTHON.replace('.', '')}",
    "--only-binary=:all:",
]
GUEST_UNITS = ("khod-vmm.service", "khod-kvstore.service", "khod-vmtest.service")
ENABLED = ("khod.socket", "khod.service", *GUEST_UNITS)
WRAPPER = "#!/usr/bin/python3\nimport sys\n\nfrom {module} import main\n\nsys.exit(main())\n"


@dataclass(frozen=True)
class Image:
    disk: Path
    kernel: Path
    initrd: Path
    release: str  # the guest kernel's uname -r
    base_built: bool  # the base tree was built by this run (not cached)
    wheels_downloaded: bool  # some dependency was not in the wheel cache


def guest_config(text: str, params: dict[str, Any]) -> str:
    """config/khod.toml with the devmem backend on the reserved range: one key at a time.

    Each key must be found exactly once in its section, so a change to the
    shipped file fails the build by name instead of booting something else.
    """
    edits = {
        ("region", "backend"): '"devmem"',
        ("region", "path"): '"/dev/mem"',
        ("region", "base"): f"{params['base']:#x}",
        ("region", "size"): f'"{params["size"] >> 20}M"',
        ("server", "memory_group"): f'"{params["memory_group"]}"',
    }
    sections = re.split(r"(?m)^(?=\[)", text)
    out = []
    for chunk in sections:
        m = re.match(r"\[([^\]]+)\]", chunk)
        name = m.group(1) if m else ""
        for (section, key), value in edits.items():
            if section != name:
                continue
            chunk, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", chunk)
            if n != 1:
                raise base.BuildError(f"config/khod.toml: [{section}] {key} found {n} times")
        out.append(chunk)
    result = "".join(out)
    for section in sorted({section for section, _ in edits}):
        if f"[{section}]" not in result:
            raise base.BuildError(f"config/khod.toml: no [{section}] section")
    return result


def requirements(wheel: Path) -> list[str]:
    """The wheel's run-time requirements (no extras), from its METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [
        line.split(":", 1)[1].strip()
        for line in lines
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]


def source_tree(repo: Path, dest: Path) -> Path:
    """The checkout's files, tracked or new but not ignored, copied to ``dest``.

    The wheel is built from this copy, not the checkout: setuptools' ``build/``
    directory can carry modules deleted since into a wheel, and a build leaves
    ``build/`` and ``*.egg-info`` behind.
    """
    r = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        timeout=60,
    )
    if r.returncode:
        raise base.BuildError(
            f"git ls-files in {repo}: {r.stderr.decode(errors='replace').strip()}"
        )
    for name in r.stdout.decode().split("\0"):
        src = repo / name
        if name and src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def install_khod(
    repo: Path, cache: Path, work: Path, log: Path, say: base.Say
) -> tuple[Path, bool]:
    """khod's wheel and its dependencies for the guest, in ``work/site``; (site, downloaded)."""
    wheels = work / "wheel"
    src = source_tree(repo, work / "src")
    base.run(pip("wheel", "--no-deps", "--wheel-dir", str(wheels), str(src)), log, timeout=600)
    (wheel,) = wheels.glob("khod-*.whl")
    cached = cache / "wheels"
    cached.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    install = pip(
        "install",
        "--target",
        str(site),
        *WHEEL_TARGET,
        "--no-index",
        "--find-links",
        str(cached),
        str(wheel),
    )
    try:
        base.run(install, log, timeout=600)
        return site, False
    except base.BuildError:
        pass  # a requirement not cached yet: download what is missing, once
    reqs = requirements(wheel)
    say(f"downloading wheels for the guest's CPython {PYTHON}: {', '.join(reqs)}")
    base.run(pip("download", "--dest", str(cached), *WHEEL_TARGET, *reqs), log, timeout=900)
    shutil.rmtree(site, ignore_errors=True)
    base.run(install, log, timeout=600)
    return site, True


def build(
    repo: Path, cache: Path, work: Path, params: dict[str, Any], log: Path, say: base.Say
) -> Image:
    """The disk image and kernel for one run, in ``work``."""
    tree, built = base.ensure(cache, log, say)
    site, downloaded = install_khod(repo, cache, work, log, say)
    root = work / "root"
    with base.locked(cache, exclusive=False):
        base.run(["cp", "-a", "--reflink=auto", str(tree), str(root)], log, timeout=600)
    (root / ".complete").unlink()
    shutil.copytree(site, root / SITE, dirs_exist_ok=True, symlinks=True)
    shutil.rmtree(root / SITE / "bin", ignore_errors=True)  # scripts for the host's python
    usr_bin = root / "usr" / "bin"
    for name, module in (("khod", "khod.main"), ("khoctl", "khoclient.ctl")):
        (usr_bin / name).write_text(WRAPPER.format(module=module))
        (usr_bin / name).chmod(0o755)
    deploy(repo, root, params)
    chroot = ["chroot", str(root)]
    base.run([*chroot, "systemd-sysusers"], log, timeout=120)
    base.run([*chroot, "systemctl", "enable", *ENABLED], log, timeout=120)
    base.run(
        [*chroot, "python3", "-m", "compileall", "-q", f"/{SITE}", "/usr/lib/khod-vmtest"],
        log,
        timeout=600,
    )
    base.run(
        [*chroot, "khod", "--config", "/etc/khod/khod.toml", "--check-config"], log, timeout=120
    )
    (kernel,) = (root / "boot").glob("vmlinuz-*")
    release = kernel.name.removeprefix("vmlinuz-")
    shutil.copy(kernel, work / "vmlinuz")
    shutil.copy(root / "boot" / f"initrd.img-{release}", work / "initrd.img")
    used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    size_mb = used // (1 << 20) + 512  # room for logs, the key-value store's log, journals
    disk = work / "disk.ext4"
    base.run(
        [
            "mkfs.ext4",
            "-F",
            "-q",
            "-L",
            "khod-vm",
            # initialized now: else the guest's kernel zeroes inode tables in the background
            # for minutes of emulated time, slowing every boot it runs in
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(root),
            str(disk),
            f"{size_mb}M",
        ],
        log,
        timeout=600,
    )
    shutil.rmtree(root)
    return Image(disk, work / "vmlinuz", work / "initrd.img", release, built, downloaded)


def deploy(repo: Path, root: Path, params: dict[str, Any]) -> None:
    """What README.md's deployment section installs, then the test's own units."""
    units = root / "etc" / "systemd" / "system"
    src = repo / "systemd"
    for name in ("khod.socket", "khod.service"):
        shutil.copy(src / name, units / name)
    (units / "khod.service.d").mkdir(exist_ok=True)
    shutil.copy(src / "devmem.conf", units / "khod.service.d" / "devmem.conf")
    shutil.copy(src / "khod.sysusers.conf", root / "usr" / "lib" / "sysusers.d" / "khod.conf")
    shutil.copy(src / "khod.tmpfiles.conf", root / "usr" / "lib" / "tmpfiles.d" / "khod.conf")
    etc_khod = root / "etc" / "khod"
    etc_khod.mkdir(exist_ok=True)
    (etc_khod / "khod.toml").write_text(
        guest_config((repo / "config" / "khod.toml").read_text(), params)
    )
    for name in GUEST_UNITS:
        shutil.copy(GUEST / name, units / name)
    shutil.copy(GUEST / "sysusers.conf", root / "usr" / "lib" / "sysusers.d" / "khod-vmtest.conf")
    lib = root / "usr" / "lib" / "khod-vmtest"
    lib.mkdir(exist_ok=True)
    shutil.copy(GUEST / "vmguest.py", lib / "vmguest.py")
    (root / "etc" / "khod-vmtest.json").write_text(json.dumps(params, indent=1) + "\n")
