"""libkhodclient (clients/c) against a real daemon, built warning-free and under ASan/UBSan.

The library and its programs are built once per run into a temporary
directory, twice: plain (-Wall -Wextra -Werror) and with AddressSanitizer
and UndefinedBehaviorSanitizer (LeakSanitizer included). Every C program the
tests run is the sanitized build, so a leak, overflow or undefined behaviour
anywhere fails the test. Skipped, saying why, only when there is no C
compiler or no msgpack-c (CI installs both: .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from .helpers import UNPRIVILEGED, Daemon, daemon_running, needs_root, write_config

ROOT = Path(__file__).resolve().parent.parent
CDIR = ROOT / "clients" / "c"
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "LSAN_OPTIONS": "exitcode=87",
}
PROBE = "#include <msgpack.h>\nint main(void) { msgpack_sbuffer b; msgpack_sbuffer_init(&b); "
PROBE += "msgpack_sbuffer_destroy(&b); return 0; }\n"


def missing_toolchain(cc: str, d: Path) -> str | None:
    """Why the C client cannot be built here, or None."""
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    if shutil.which("make") is None:
        return "no make"
    (d / "probe.c").write_text(PROBE)
    probe = subprocess.run(
        [cc, str(d / "probe.c"), "-o", str(d / "probe"), "-lmsgpackc"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"msgpack-c is not installed (Debian: libmsgpack-dev): {probe.stderr.strip()}"
    return None


SANFLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"]  # as SAN=1
LEAK = (
    "#include <stdlib.h>\nvoid *volatile p;\nint main(void) { p = malloc(77); p = 0; return 0; }\n"
)
OVERFLOW = (
    "#include <stdlib.h>\nint main(void) { volatile char *p = malloc(8); p[8] = 1; return 0; }\n"
)


def sanitizer_probe(cc: str, d: Path, name: str, src: str) -> subprocess.CompletedProcess[str]:
    """Build and run a program that must trip the sanitizers."""
    (d / f"{name}.c").write_text(src)
    subprocess.run([cc, *SANFLAGS, str(d / f"{name}.c"), "-o", str(d / name)], check=True)
    return subprocess.run(
        [str(d / name)], capture_output=True, text=True, env={**os.environ, **SAN_ENV}
    )


class Build:
    def __init__(self, root: Path, leak_check: str) -> None:
        self.root = root
        self.plain = root / "plain"
        self.san = root / "san"
        self.leak_check = leak_check  # "" if LeakSanitizer works here, else why not

    def run(
        self, prog: str, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A sanitized program, to completion; its output is shown if it fails."""
        env = {**os.environ, **SAN_ENV}
        done = subprocess.run(
            [str(self.san / prog), *args], capture_output=True, text=True, env=env, timeout=timeout
        )
        if check:
            assert done.returncode == 0, (
                f"{prog} {args}: {done.returncode}\n{done.stdout}{done.stderr}"
            )
        return done

    def popen(self, prog: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(self.san / prog), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **SAN_ENV},
        )


@pytest.fixture(scope="module")
def cbuild() -> Iterator[Build]:
    cc = os.environ.get("CC", "cc")
    root = Path(tempfile.mkdtemp(prefix="khod-c-"))
    try:
        why = missing_toolchain(cc, root)
        if why:
            pytest.skip(why)
        leak = sanitizer_probe(cc, root, "leak", LEAK)
        if leak.returncode != 87 and "LeakSanitizer has encountered a fatal error" in leak.stderr:
            # e.g. a container that forbids ptrace: keep ASan and UBSan, say so in the probe test
            SAN_ENV["ASAN_OPTIONS"] = SAN_ENV["ASAN_OPTIONS"].replace(
                "detect_leaks=1", "detect_leaks=0"
            )
            b = Build(root, f"LeakSanitizer cannot run here: {leak.stderr.strip()[-300:]}")
        else:
            b = Build(root, "")
        for out, extra in ((b.plain, []), (b.san, ["SAN=1"])):
            done = subprocess.run(
                ["make", "-s", "-j2", "-C", str(CDIR), f"BUILD={out}", f"CC={cc}", *extra],
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, f"the C client does not build:\n{done.stdout}{done.stderr}"
        yield b
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_sanitizers_catch_an_overflow_and_a_leak(cbuild: Build) -> None:
    """The sanitized runs below would pass vacuously if the sanitizers were not live."""
    cc = os.environ.get("CC", "cc")
    over = sanitizer_probe(cc, cbuild.root, "overflow", OVERFLOW)
    assert over.returncode != 0 and "heap-buffer-overflow" in over.stderr, over.stderr
    if cbuild.leak_check:
        pytest.skip(cbuild.leak_check)
    leak = sanitizer_probe(cc, cbuild.root, "leak", LEAK)
    assert leak.returncode == 87 and "detected memory leaks" in leak.stderr, leak.stderr


def reports(text: str) -> list[dict[str, object]]:
    return [json.loads(line[7:]) for line in text.splitlines() if line.startswith("report ")]


def next_report(stream: IO[str]) -> dict[str, object]:
    """The next ``report`` line a running example prints (its other lines are for people)."""
    for line in stream:
        if line.startswith("report "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise AssertionError("the example ended without another report")


def operator(d: Daemon, *ops: str) -> None:
    with d.client() as op:
        for name in ops:
            getattr(op, name)()


# ----------------------------------------------------------------------------- build and install


def test_installs_with_a_pkg_config_file_a_program_can_build_with(
    cbuild: Build, shm_dir: Path
) -> None:
    if shutil.which("pkg-config") is None:
        pytest.skip("no pkg-config")
    prefix = shm_dir / "prefix"
    done = subprocess.run(
        ["make", "-s", "-C", str(CDIR), f"BUILD={cbuild.plain}", f"PREFIX={prefix}", "install"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PKG_CONFIG_PATH": str(prefix / "lib" / "pkgconfig")}
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "--static", "khodclient"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    assert f"-I{prefix}/include" in flags and "-lkhodclient" in flags and "-lmsgpackc" in flags
    src = shm_dir / "use.c"
    src.write_text(
        "#include <khodclient.h>\n#include <errno.h>\n#include <stdio.h>\n"
        "int main(int argc, char **argv) { khod_client *c; (void)argc;\n"
        '  int s = khod_connect(argv[1], &c); if (s < 0) { printf("%d\\n", s); return 0; }\n'
        '  s = khod_ping(c); khod_close(c); printf("%d\\n", s); return 0; }\n'
    )
    exe = shm_dir / "use"
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [cc, "-Wall", "-Werror", str(src), "-o", str(exe), f"-Wl,-rpath,{prefix}/lib", *flags],
        check=True,
        env=env,
    )
    with daemon_running(shm_dir) as d:
        assert subprocess.run([str(exe), d.socket], capture_output=True, text=True).stdout == "0\n"
    out = subprocess.run([str(exe), str(shm_dir / "nobody.sock")], capture_output=True, text=True)
    assert out.stdout.strip() == str(-2)  # -ENOENT: no socket there


# ----------------------------------------------------------------------------- the example


def test_the_c_example_carries_its_table_across_two_handovers(cbuild: Build, shm_dir: Path) -> None:
    cfg = write_config(shm_dir)
    dumps = [shm_dir / f"table{i}.bin" for i in range(4)]
    with daemon_running(shm_dir, config=cfg) as d:
        run = cbuild.popen("khod-counters", "run", "-s", d.socket, "-m", "4", "-d", str(dumps[0]))
        assert run.stdout is not None
        assert next_report(run.stdout)["event"] == "ready"
        operator(d, "finalize", "handover")
        out, err = run.communicate(timeout=30)
        assert run.returncode == 0, out + err
        events = reports(out)
        assert [e["event"] for e in events] == ["finalize", "handover"]
        assert d.wait() == 0
    fin = events[0]
    assert int(fin["total"]) > 0  # type: ignore[call-overload]
    assert dumps[0].stat().st_size == 4 << 20 and dumps[0].read_bytes().count(0) < 4 << 20

    with daemon_running(shm_dir, config=cfg) as d:
        # restore, verify, and carry on counting in the successor
        cont = cbuild.popen("khod-counters", "verify", "--run", "-s", d.socket, "-d", str(dumps[1]))
        assert cont.stdout is not None
        verified = next_report(cont.stdout)
        assert verified["event"] == "verified" and verified["ok"] is True, verified
        assert verified["checksum"] == fin["checksum"]
        assert dumps[1].read_bytes() == dumps[0].read_bytes()  # byte for byte
        assert next_report(cont.stdout)["event"] == "ready"
        operator(d, "finalize", "unfreeze", "finalize", "handover")  # writers resume, pause
        out, err = cont.communicate(timeout=30)
        assert cont.returncode == 0, out + err
        events = reports(out)
        assert [e["event"] for e in events] == ["finalize", "unfreeze", "finalize", "handover"]
        assert d.wait() == 0
    later = events[2]
    assert int(later["total"]) > int(fin["total"])  # type: ignore[call-overload]

    with daemon_running(shm_dir, config=cfg) as d:
        done = cbuild.run("khod-counters", "verify", "-s", d.socket, "-d", str(dumps[2]))
        got = reports(done.stdout)[0]
        assert got["ok"] is True and got["checksum"] == later["checksum"]
        assert got["total"] == later["total"]
        assert d.stop() == 0


def test_c_client_restores_each_way_in_the_successor(cbuild: Build, shm_dir: Path) -> None:
    cfg = write_config(shm_dir)
    with daemon_running(shm_dir, config=cfg) as d:
        cbuild.run("khod-c-check", d.socket, "handover-prep")
        operator(d, "finalize", "handover")
        assert d.wait() == 0
    with daemon_running(shm_dir, config=cfg) as d:
        cbuild.run("khod-c-check", d.socket, "handover-check")
        assert d.stop() == 0


def test_the_c_example_refuses_a_table_that_changed(cbuild: Build, shm_dir: Path) -> None:
    cfg = write_config(shm_dir)
    with daemon_running(shm_dir, config=cfg) as d:
        with cbuild.popen("khod-counters", "run", "-s", d.socket, "-m", "2", "-n", "t") as run:
            assert run.stdout is not None and next_report(run.stdout)["event"] == "ready"
            operator(d, "finalize", "handover")
            out, err = run.communicate(timeout=30)
            assert run.returncode == 0, out + err
        assert d.wait() == 0
    # the bytes the successor restores, in the session's memory file (docs/protocol.md §8)
    (memfile,) = (shm_dir / "region.sessions").glob(f"{os.getuid()}.t")
    fd = os.open(memfile, os.O_RDWR)
    try:
        table = os.lseek(fd, 0, os.SEEK_DATA)  # the file is sparse but for the table
        data = bytearray(os.pread(fd, 2 << 20, table))
        at = next((i for i in range(8, len(data), 16) if data[i]), None)  # a counter that counted
        assert at is not None, (table, data.count(0), len(data))
        os.pwrite(fd, bytes([data[at] ^ 1]), table + at)
    finally:
        os.close(fd)
    with daemon_running(shm_dir, config=cfg) as d:
        done = cbuild.run("khod-counters", "verify", "-s", d.socket, "-n", "t", check=False)
        assert done.returncode == 1, done.stdout + done.stderr
        assert reports(done.stdout)[0]["ok"] is False
        assert d.stop() == 0


# ----------------------------------------------------------------------------- error paths


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    d = Path(
        tempfile.mkdtemp(prefix="khodc-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    try:
        with daemon_running(d) as daemon:
            yield daemon
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    "case", ["api", "wrong-session", "frozen", "veto", "oversized", "busy-poll"]
)
def test_c_client_calls_and_errors(cbuild: Build, shared_daemon: Daemon, case: str) -> None:
    done = cbuild.run("khod-c-check", shared_daemon.socket, case, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{case}: 0 failures" in done.stdout
    with shared_daemon.client() as op:  # the daemon is none the worse, and active again
        assert op.status()["state"] == "active"


@needs_root
def test_c_client_cannot_reach_another_users_memory(cbuild: Build, shm_dir: Path) -> None:
    os.chmod(shm_dir, 0o755)
    os.chmod(cbuild.root, 0o755)
    cfg = write_config(shm_dir, server={"socket_mode": 0o666})
    with daemon_running(shm_dir, config=cfg) as d, d.client("vmm", persistent=True) as vmm:
        f = vmm.alloc_folio(0)
        view = vmm.map(f)
        view[:6] = b"SECRET"
        del view
        vmm.preserve_folio(f)
        done = cbuild.run(
            "khod-c-check", d.socket, "eperm", hex(f.phys), str(UNPRIVILEGED), check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert bytes(vmm.map(f)[:6]) == b"SECRET"
        assert vmm.status()["sessions"][0]["preserved_bytes"] == 4096


def test_c_client_fails_its_call_when_the_daemon_dies_mid_call(
    cbuild: Build, shm_dir: Path
) -> None:
    with daemon_running(shm_dir) as d:
        check = cbuild.popen("khod-c-check", d.socket, "gone")
        assert check.stdout is not None
        line = check.stdout.readline()  # the finalize is waiting on its notifier round
        assert line == "in-call\n", line + check.stderr.read()
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        os.unlink(d.socket)  # as after a crash: nothing listens there
        out, err = check.communicate("dead\n", timeout=30)
        assert check.returncode == 0, out + err


# ----------------------------------------------------------------------------- hostile replies


def test_c_decoder_survives_hostile_replies(cbuild: Build) -> None:
    done = cbuild.run("khod-c-fuzz", "20261127", "8000", timeout=120)
    assert "8000 random cases, 0 failures" in done.stdout
