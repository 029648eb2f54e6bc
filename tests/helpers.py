"""Running khod for tests: in-process (trio) and as a real subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from khoclient import Client, KhoError

from khod.config import Config, from_mapping
from khod.log import Log
from khod.main import assemble, engine_limits
from khod.metrics import Metrics
from khod.region import open_region
from khod.server import Server, bind_unix
from khod.startup import start_engine

BASE = 0x1_0000_0000


def config_mapping(d: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, dict[str, Any]] = {
        "region": {"path": str(d / "region"), "size": "256M", "scratch_size": "4M"},
        "server": {"socket": str(d / "khod.sock"), "notifier_timeout_s": 5},
        "metrics": {"listen": ""},
    }
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return data


def write_config(d: Path, name: str = "khod.toml", **sections: dict[str, Any]) -> Path:
    lines = []
    for section, table in config_mapping(d, **sections).items():
        lines.append(f"[{section}]")
        for k, v in table.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, int | float):
                lines.append(f"{k} = {v}")
            else:
                lines.append(f'{k} = "{v}"')
    path = d / name
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Daemon:
    """A khod subprocess."""

    proc: subprocess.Popen[bytes]
    dir: Path
    socket: str
    log: Path
    extra: list[str] = field(default_factory=list)

    def client(self, session: str | None = None, persistent: bool = False, **kw: Any) -> Client:
        return Client(self.socket, session=session, persistent=persistent, **kw)

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_daemon(
    d: Path,
    *args: str,
    config: Path | None = None,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 20,
) -> Daemon:
    config = config or write_config(d)
    log = d / f"khod-{time.monotonic_ns()}.log"
    sock = str(d / "khod.sock")
    full_env = {k: v for k, v in os.environ.items() if k != "KHOD_FAULT"}
    full_env.update(env or {})
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "khod", "-c", str(config), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    daemon = Daemon(proc, d, sock, log, list(args))
    if wait_ready:
        deadline = time.monotonic() + timeout
        while not any(mark in daemon.logs() for mark in ("event=ready", '"event": "ready"')):
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"khod did not become ready:\n{daemon.logs()}")
            time.sleep(0.02)
    return daemon


@contextlib.contextmanager
def daemon_running(d: Path, *args: str, **kw: Any) -> Iterator[Daemon]:
    daemon = start_daemon(d, *args, **kw)
    try:
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


@dataclass
class InProc:
    server: Server
    socket: str
    config: Config
    log: io.StringIO
    metrics: Metrics | None = None

    @property
    def metrics_url(self) -> tuple[str, int]:
        assert self.metrics is not None
        return self.metrics.bound


@contextlib.asynccontextmanager
async def inproc_daemon(
    d: Path, with_metrics: bool = False, **sections: dict[str, Any]
) -> AsyncIterator[InProc]:
    """A daemon inside the test's trio loop (no signal handling, faults disabled)."""
    if with_metrics:
        sections.setdefault("metrics", {})["listen"] = "127.0.0.1:0"
    cfg = from_mapping(config_mapping(d, **sections), source="test")
    r = cfg.region
    region = open_region(r.backend, r.path, base=r.base, size=r.size)
    try:
        engine, info = start_engine(
            region,
            scratch_size=r.scratch_size,
            pid=os.getpid(),
            limits=engine_limits(cfg, region.size),
        )
        buf = io.StringIO()
        log = Log("debug", stream=buf)
        daemon = assemble(engine, info, cfg, log, with_metrics=with_metrics, handle_signals=False)
        server, m = daemon.server, daemon.metrics
        listener, _ = bind_unix(cfg.server.socket, cfg.server.socket_mode, "")
        async with trio.open_nursery() as nursery:
            if m is not None:
                await m.serve(nursery, await trio.open_tcp_listeners(0, host="127.0.0.1"))
            await nursery.start(server.run, [listener])
            try:
                yield InProc(server, cfg.server.socket, cfg, buf, m)
            finally:
                server.request_stop("test over")
                await server.finished.wait()
                nursery.cancel_scope.cancel()
                engine.close()
    finally:
        region.close()


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(tag: str, phys: int, size: int) -> bytes:
    seed = hashlib.sha256(f"{tag}:{phys}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(10)
    return s


# ----------------------------------------------------------------------------- other users

UNPRIVILEGED = 65534


def spawn_activated(
    listener: socket.socket,
    cfg: Path,
    log: Path,
    *args: str,
    settings: str = "",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``khod -c cfg ARGS`` started as systemd starts a socket-activated service: the
    listening socket as fd 3, LISTEN_PID its own pid, LISTEN_FDS=1, and ``settings``
    (more ``VAR=value`` words, ``$$`` being that pid) set the same way."""
    fd = listener.fileno()

    def as_fd3() -> None:
        if fd != 3:
            os.dup2(fd, 3)

    line = f'LISTEN_PID=$$ LISTEN_FDS=1 {settings}exec "{sys.executable}" -m khod -c {cfg}'
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["sh", "-c", " ".join([line, *args])],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(3,),
            preexec_fn=as_fd3,
        )


def as_nobody(
    socket_path: str, actions: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fork, drop to uid/gid 65534, run ``actions`` against khod; returns what it reports.

    ``actions`` is Python run with ``Client``, ``KhoError``, ``path`` (the
    socket), ``out`` (a dict to fill with JSON-able results) and ``extra``.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no trio, no threads yet
        os.close(r)
        out: dict[str, Any] = {}
        try:
            os.setgroups([])
            os.setgid(UNPRIVILEGED)
            os.setuid(UNPRIVILEGED)
            env: dict[str, Any] = {
                "Client": Client,
                "KhoError": KhoError,
                "out": out,
                "path": socket_path,
                **(extra or {}),
            }
            exec(actions, env)
        except BaseException as exc:
            out["crash"] = repr(exc)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a client as another uid"
)
