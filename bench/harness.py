"""What the benchmarks share to run khod as a real process: write its config,
start it, wait for its socket, connect, time a call in a loop, and leave
nothing running."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from khoclient import Client, KhoError


def khod_config(
    d: Path,
    size: str,
    *,
    scratch: str = "64M",
    metrics: str = "",
    level: str = "warning",
    server: str = "",
    name: str = "khod.toml",
    region: str = "region",
) -> Path:
    """Write a khod config into ``d``: a sparse region file of ``size`` there, the
    socket ``d/khod.sock``, no quota but the region (``uid_max_bytes`` 100%).

    ``server`` adds lines to ``[server]``; ``metrics`` is ``metrics.listen``
    ("": none); ``name`` and ``region`` name the config and region files.
    """
    cfg = d / name
    extra = f"{server}\n" if server else ""
    cfg.write_text(
        f'[region]\npath = "{d}/{region}"\nsize = "{size}"\nscratch_size = "{scratch}"\n'
        f'[server]\nsocket = "{d}/khod.sock"\n{extra}[metrics]\nlisten = "{metrics}"\n'
        f'[limits]\nuid_max_bytes = "100%"\n[logging]\nlevel = "{level}"\n'
    )
    return cfg


def start_khod(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m khod -c cfg``, its output appended to ``log``; does not wait."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "khod", "-c", str(cfg)], stdout=out, stderr=subprocess.STDOUT
        )


def wait_for_socket(
    path: str, proc: subprocess.Popen[bytes], timeout: float = 30, log: Path | None = None
) -> None:
    """Until a client can connect to ``path``; fails at once if ``proc`` exits
    (with ``log``'s text, when given, in the error)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            Client(path, timeout=5).close()
            return
        except KhoError:
            why = None
            if proc.poll() is not None:
                why = f"server exited with {proc.returncode}"
            elif time.monotonic() > deadline:
                why = f"{path}: nobody answered in {timeout:g} s"
            if why is not None:
                text = f"{why}:\n{log.read_text(errors='replace')}" if log else why
                fail = RuntimeError if proc.returncode is not None else TimeoutError
                raise fail(text) from None
            time.sleep(0.005)


def connect(sock: str, proc: subprocess.Popen[bytes], **kw: Any) -> Client:
    """A client with a long timeout (big batches), retried while khod starts."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return Client(sock, timeout=600, **kw)
        except KhoError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def rate(fn: Callable[[], None], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


def show_log(log: Path) -> None:
    """The end of khod's log on stderr, for a benchmark that failed."""
    if log.exists():
        sys.stderr.write(f"khod's log:\n{log.read_text(errors='replace')[-4000:]}\n")


def kill_all(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """Kill and reap whatever of ``procs`` still runs."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
