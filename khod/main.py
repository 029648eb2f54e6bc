"""``khod [--config FILE] [--reset | --standby] [--check-config]``: run the daemon.

config -> region -> start-up -> serve. Exit status (:class:`khod.startup.Exit`):
0 after a clean stop or a handover (or a standby stopped while it waited), 1
when a stop could not hand over as configured, 2 for a configuration or
environment error, 3 when an incoming handover is refused (the region is left
untouched for ``khoctl inspect``), 4 when the region belongs to a live or
crashed daemon (or another standby waits for it).

A cold start is mostly imports, so this module imports at the top only what
start-up, populate and serving need; what only some paths need is imported
where it is used (``prometheus_client`` when metrics are served, ``fdt`` where
a DTB is read or written, ``tomllib`` when a config file is read, ``json`` for
JSON logs and some flags). A standby (``khod/standby.py``) imports all of it
before it waits.
"""

from __future__ import annotations

import os

# khod does no linear algebra, so numpy's OpenBLAS need not start a thread per core: on
# a busy machine those threads compete with the import itself (up to tens of ms of a cold
# start, bench/blackout.py). Set before the imports below load numpy; an explicit setting
# wins, and only the daemon is concerned (clients import khod.errors, never this module).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import contextlib
import functools
import importlib
import resource
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from khod import __version__, faults, standby, systemd
from khod.config import Config, ConfigError, load, override, parse_listen
from khod.engine import Engine, EngineLimits
from khod.errors import HandoverError, KhoError
from khod.faults import FaultPoint
from khod.kho.handover import Hook, no_hook
from khod.kho.record import read_record
from khod.kho.tree import TreeLimits
from khod.lifecycle import Lifecycle, State
from khod.log import Log
from khod.ops import OPS
from khod.region import Region, open_region
from khod.server import Connections, Server, bind_unix, unlink_if_ours
from khod.startup import Exit, StartInfo, StartPlan, StartupRefused, plan_start

if TYPE_CHECKING:
    from khod.metrics import Metrics

# Imported where first used, not at start-up; a standby imports them before it waits.
DEFERRED_IMPORTS = ("fdt", "ctypes.util", "tomllib", "json")


def parser() -> argparse.ArgumentParser:
    """The command line (``tools/gendata.py`` builds khod(8) and completions from it too)."""
    ap = argparse.ArgumentParser(
        prog="khod",
        description="userspace Kexec HandOver daemon: keep memory across a live update",
    )
    ap.add_argument("--config", "-c", help="TOML file (default /etc/khod/khod.toml if present)")
    ap.add_argument(
        "--reset",
        action="store_true",
        help="discard a live, damaged or unwanted handover record and start empty",
    )
    ap.add_argument(
        "--standby",
        action="store_true",
        help="start beside the daemon that holds the region, ready, and take the region "
        "over the moment it hands over (or exits); start at once if nobody holds it",
    )
    ap.add_argument(
        "--check-config",
        action="store_true",
        help="validate, print the effective configuration and exit",
    )
    ap.add_argument("--socket", help="override server.socket")
    ap.add_argument("--region-path", help="override region.path")
    ap.add_argument("--region-size", help="override region.size (e.g. 4G)")
    ap.add_argument("--metrics-listen", help="override metrics.listen ('' turns it off)")
    ap.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="override logging.level"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any key (repeatable)",
    )
    ap.add_argument("--version", action="version", version=f"khod {__version__}")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)


def effective_config(args: argparse.Namespace) -> Config:
    cfg = load(args.config)
    sets = list(args.set)
    for flag, key in (
        ("socket", "server.socket"),
        ("region_path", "region.path"),
        ("region_size", "region.size"),
        ("metrics_listen", "metrics.listen"),
        ("log_level", "logging.level"),
    ):
        value = getattr(args, flag)
        if value is not None:
            import json  # a TOML string, quoted; only when such a flag is given

            sets.append(f"{key}={json.dumps(value)}")
    return override(cfg, sets) if sets else cfg


def render_config(cfg: Config) -> str:
    """The effective configuration as TOML."""
    import json

    lines = [f"# effective configuration (from {cfg.source})"]
    for section, table in cfg.as_dict().items():
        lines.append(f"\n[{section}]")
        for key, value in table.items():
            if value is None:
                shown = '"auto"'
            elif isinstance(value, bool):
                shown = "true" if value else "false"
            elif key == "base":
                shown = f"{value:#x}"
            elif key == "socket_mode":
                shown = f"0o{value:o}"
            elif isinstance(value, float) and key == "uid_max_bytes":
                shown = json.dumps(f"{value * 100:g}%")
            elif isinstance(value, int | float):
                shown = str(value)
            else:
                shown = json.dumps(value)
            lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"


def engine_limits(cfg: Config, region_size: int) -> EngineLimits:
    lim = cfg.limits
    share = lim.uid_max_bytes
    return EngineLimits(
        max_sessions=lim.max_sessions,
        max_batch=lim.max_batch,
        tree=TreeLimits(max_nodes=lim.tree_max_nodes, max_bytes=lim.tree_max_bytes),
        tree_total_nodes=lim.tree_total_nodes,
        tree_total_bytes=lim.tree_total_bytes,
        uid_max_bytes=int(share * region_size) if isinstance(share, float) else share,
        uid_max_sessions=lim.uid_max_sessions,
        uid_max_tree_bytes=lim.uid_max_tree_bytes,
    )


@dataclass
class Daemon:
    """One daemon's parts, wired once: the command and the tests build it the same way."""

    engine: Engine
    info: StartInfo
    conns: Connections
    metrics: Metrics | None
    lifecycle: Lifecycle
    server: Server


def assemble(
    engine: Engine,
    info: StartInfo,
    cfg: Config,
    log: Log,
    *,
    hook: Hook = no_hook,
    with_metrics: bool = True,
    handle_signals: bool = True,
) -> Daemon:
    conns = Connections()
    metrics = None
    if with_metrics:
        from khod.metrics import Metrics  # prometheus_client: only when metrics are served

        metrics = Metrics(
            engine,
            info,
            conns,
            ops=OPS,
            listen=cfg.metrics.listen,
            notifier_timeout_s=cfg.server.notifier_timeout_s,
            state_dir=cfg.server.state_dir,
            log=log,
        )
    lifecycle = Lifecycle(
        engine,
        conns,
        notifier_timeout_s=cfg.server.notifier_timeout_s,
        handover_on_stop=cfg.server.handover_on_stop,
        log=log,
        metrics=metrics,
        hook=hook,
        announce=systemd.status,
    )
    server = Server(
        engine, lifecycle, conns, cfg, log, metrics=metrics, handle_signals=handle_signals
    )
    return Daemon(engine, info, conns, metrics, lifecycle, server)


def control_listeners(
    cfg: Config, log: Log
) -> tuple[list[trio.SocketListener], tuple[int, int] | None]:
    """The control socket: passed by systemd, or bound here (with its identity, to unlink)."""
    activated = systemd.listen_fds()
    if activated:
        log.info("listen", socket="systemd socket activation", fds=len(activated))
        return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in activated], None
    listener, identity = bind_unix(
        cfg.server.socket, cfg.server.socket_mode, cfg.server.socket_group
    )
    log.info("listen", socket=cfg.server.socket, mode=f"{cfg.server.socket_mode:o}")
    return [listener], identity


def log_start(log: Log, region: Region, info: StartInfo) -> None:
    if info.reset_from:
        log.warning("start.reset", discarded=info.reset_from, region=region.path)
    log.info(
        "start",
        mode=info.mode,
        generation=info.generation,
        region=f"{region.backend}:{region.path}",
        base=f"{region.base:#x}",
        size=region.size,
        incoming_sessions=info.incoming_sessions or None,
        incoming_bytes=info.incoming_bytes or None,
        populate_ms=round(info.populate_s * 1e3, 3) if info.mode == "populate" else None,
        version=__version__,
    )


async def serve(
    plan: StartPlan, cfg: Config, log: Log, listeners: list[trio.SocketListener]
) -> Daemon:
    """Bind the metrics port, build the engine, serve until stopped.

    Every socket is bound before :meth:`StartPlan.take` changes anything, so a
    port in use stops start-up with the region as it was.
    """
    metrics_listeners = []
    if cfg.metrics.listen:
        host, port = parse_listen(cfg.metrics.listen, "metrics.listen")
        metrics_listeners = await trio.open_tcp_listeners(port, host=host)
    engine, info = plan.take()
    log_start(log, plan.region, info)
    d = assemble(engine, info, cfg, log, hook=faults.point, with_metrics=bool(metrics_listeners))
    d.server.on_quiet = functools.partial(let_go, plan.region, log)
    async with trio.open_nursery() as nursery:
        if d.metrics is not None:
            await d.metrics.serve(nursery, metrics_listeners)
        await nursery.start(d.server.run, listeners)
        state = d.lifecycle.state
        systemd.notify(
            "READY=1",
            f"STATUS={state}: generation {engine.generation}, {len(engine.sessions)} sessions",
        )
        log.info("ready", state=str(state), generation=engine.generation)
        faults.point(FaultPoint.READY)
        await d.server.finished.wait()
        nursery.cancel_scope.cancel()
    return d


def let_go(region: Region, log: Log) -> None:
    """After a handover, once no request can run any more: flush and let the region go.

    Called before the connections' output has drained (``Server.on_quiet``),
    so that a peer that never reads cannot keep a standby successor waiting
    for the two seconds of grace the daemon gives it.
    """
    region.flush()
    region.unlock()
    log.info("region.released", reason="handed over; no request runs any more")


def preload(cfg: Config) -> None:
    """Import now what this daemon would otherwise import when first needed (a standby)."""
    for name in DEFERRED_IMPORTS:
        importlib.import_module(name)
    if cfg.metrics.listen:
        importlib.import_module("khod.metrics")
        importlib.import_module("khod.metrics_export")  # these two: else with the first scrape
        importlib.import_module("khod.metrics_http")
        importlib.import_module("encodings.idna")  # getaddrinfo encodes the metrics host with it


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.standby and args.reset:
        print(
            "khod: --standby and --reset exclude each other: a reset would discard "
            "what the daemon being replaced hands over",
            file=sys.stderr,
        )
        return Exit.CONFIG
    try:
        cfg = effective_config(args)
    except ConfigError as exc:
        print(f"khod: {exc.message}", file=sys.stderr)
        return Exit.CONFIG
    if args.check_config:
        print(render_config(cfg), end="")
        return Exit.OK
    log = Log(cfg.logging.level, cfg.logging.format)
    if args.standby:
        preload(cfg)
    r = cfg.region
    try:
        region = open_region(r.backend, r.path, base=r.base, size=r.size)
    except KhoError as exc:
        log.error("region.open_failed", backend=r.backend, path=r.path, reason=exc.message)
        return Exit.CONFIG
    try:
        return _run_on_region(region, cfg, args, log)
    finally:
        try:
            region.flush()
        finally:
            region.close()


def raise_nofile(cfg: Config, log: Log) -> None:
    """Raise the open-file soft limit to the hard one: sessions' files and connections need them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    need = cfg.limits.max_connections + cfg.limits.max_sessions + 256
    if soft < need:
        log.warning(
            "limits.nofile",
            open_files=soft,
            reason=f"fewer than the {need} that max_connections and max_sessions may need",
        )


def _holder(region: Region) -> str:
    """Who holds the region and what its record says (read without the lock: for the log)."""
    pid = standby.holder(region.path)
    who = f"pid {pid}" if pid is not None else "the daemon holding it"
    try:
        rec = read_record(region)
    except HandoverError:
        return who
    if rec is None:
        return who
    return f"{who} (record {rec.state.name.lower()}, generation {rec.generation})"


def _stand_by(region: Region, log: Log) -> None:
    """Wait, ready, until the daemon holding the region lets go of it; then it is ours."""
    claim = standby.claim(region)

    def waiting() -> None:
        holder = _holder(region)
        log.info("standby.waiting", region=region.path, holder=holder)
        systemd.notify("READY=1", f"STATUS=standby: waiting for {holder} to hand over")

    def overtaken() -> None:
        log.warning("standby.overtaken", region=region.path, reason="another daemon took it first")

    try:
        waited = standby.take(region, waiting, overtaken)
    finally:
        os.close(claim)  # the region is ours (or we leave): the next standby may queue
    region.check_identity()  # still the file we mapped (deleted or replaced while we waited?)
    if waited is not None:
        log.info("standby.take_over", region=region.path, waited_s=round(waited, 3))
        systemd.status("starting: the region was let go; taking it over")
    else:
        log.info("standby.no_predecessor", region=region.path, reason="nobody held it")


def _prepare(region: Region, cfg: Config, log: Log, *, wait: bool = False) -> None:
    """Take the region for this daemon and make sure khod's own writes can land."""
    if wait:
        _stand_by(region, log)
    else:
        try:
            region.lock()
        except KhoError as exc:
            raise StartupRefused(
                exc.code,
                f"the region is in use by a running daemon: {exc.message}",
                Exit.REGION_BUSY,
            ) from None
    if cfg.region.preallocate:
        region.allocate(region.base, region.size)
    short = region.backing_shortfall()
    if short:
        log.warning(
            "region.sparse",
            region=region.path,
            size=region.size,
            shortfall=short,
            reason="its filesystem cannot hold all of it; a client that fills it gets SIGBUS",
        )


def _run_on_region(region: Region, cfg: Config, args: argparse.Namespace, log: Log) -> int:
    try:
        raise_nofile(cfg, log)
        _prepare(region, cfg, log, wait=args.standby)
        plan = plan_start(
            region,
            scratch_size=cfg.region.scratch_size,
            pid=os.getpid(),
            reset=args.reset,
            limits=engine_limits(cfg, region.size),
            hook=faults.point,
        )
    except standby.StandbyStopped as exc:
        log.info("standby.stopped", signal=exc.signal_name, reason="stopped while waiting")
        return Exit.OK
    except StartupRefused as exc:
        log.error("start.refused", code=str(exc.code), reason=exc.message, region=region.path)
        if exc.fault is not None:
            from khod.metrics import record_rejection

            record_rejection(cfg.server.state_dir, exc, log)
        return exc.exit_status
    except KhoError as exc:
        log.error("start.failed", code=str(exc.code), reason=exc.message)
        return Exit.CONFIG
    identity = None
    try:
        listeners, identity = control_listeners(cfg, log)
        d = trio.run(serve, plan, cfg, log, listeners)
    except KhoError as exc:
        log.error("serve.failed", code=str(exc.code), reason=exc.message)
        return Exit.CONFIG
    except OSError as exc:
        log.error("serve.failed", reason=str(exc))
        return Exit.CONFIG
    finally:
        if identity is not None:
            unlink_if_ours(cfg.server.socket, identity)
    d.engine.close()
    if d.lifecycle.state is State.HANDED_OVER:  # (flushed by let_go, and by run() once more)
        log.info("exit", reason=d.server.exit_reason, handover_generation=d.engine.generation + 1)
    else:
        try:
            d.lifecycle.stop()
        except KhoError as exc:
            log.warning("exit.unclean", reason=exc.message)
        log.info("exit", reason=d.server.exit_reason or "stopped", state=str(d.lifecycle.state))
    return d.server.exit_status


def main() -> None:
    status = run()
    # Interpreter teardown takes tens of milliseconds (trio, numpy, every object of the
    # engine) and does nothing for us: the region is closed and its lock let go, every
    # descriptor dies with the process. A successor started once this process is gone
    # (systemctl restart) should not wait for it.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone: the status still counts
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
