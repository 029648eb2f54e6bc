"""khoctl: the operator's command line for khod (README.md, "Using it").

    khoctl [--socket PATH] [--json] COMMAND ...

Exit status says what kind of failure it was, so scripts can tell them apart:

    0  OK           done (for inspect: a successor would accept the region)
    1  LOCAL        a local problem (writing a file, refusing binary output to a terminal)
    2  USAGE        usage
    3  UNREACHABLE  the daemon is unreachable
    4  REFUSED      the daemon refused the request (the error code is printed)
    5  REJECT       inspect: a successor would refuse this region (the fault is printed)
    6  NO_HANDOVER  inspect --expect-handover: the region holds no handover
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any, TextIO

from khod.config import ConfigError, parse_size
from khod.errors import KhoError
from khod.inspect import Report, inspect_region
from khod.pids import pid_alive

from .calls import PAGE_SIZE
from .client import Client
from .core import default_socket


class Exit(IntEnum):
    """khoctl's exit status, as the module docstring (and ``khoctl --help``) lists it."""

    OK = 0
    LOCAL = 1
    USAGE = 2  # argparse exits with 2 on its own
    UNREACHABLE = 3
    REFUSED = 4
    REJECT = 5
    NO_HANDOVER = 6


class Unreachable(Exception):
    pass


def emit_json(doc: Any, out: TextIO, indent: int | None = 2) -> None:
    """``--json`` output: one document with sorted (stable) keys, then a newline."""
    json.dump(doc, out, indent=indent, sort_keys=True)
    out.write("\n")


def human(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(
    rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO, indent: str = "  "
) -> None:
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        out.write(
            indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
        )


def orders_text(orders: dict[str, Any]) -> str:
    parts = []
    for order, v in sorted(orders.items(), key=lambda kv: int(kv[0])):
        parts.append(f"o{order}: {v['folios']} x {human(PAGE_SIZE << int(order))}")
    return ", ".join(parts) or "-"


# ----------------------------------------------------------------------------- commands


def connect(args: argparse.Namespace) -> Client:
    try:
        return Client(args.socket, timeout=args.timeout)
    except KhoError as exc:
        raise Unreachable(exc.message) from None


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    with connect(args) as c:
        st = c.status()
    if args.json:
        emit_json(st, out)
        return Exit.OK
    r = st["region"]
    out.write(
        f"khod  state {st['state']}  generation {st['generation']}  pid {st['pid']}  "
        f"connections {st['connections']}{'  (frozen)' if st.get('frozen') else ''}\n"
    )
    out.write(f"region  {r['backend']}:{r['path']}  base {r['base']:#x}  size {human(r['size'])}\n")
    table(
        [
            [
                human(r["free"]),
                human(r["allocated"]),
                human(r["preserved"]),
                human(r["metadata"]),
                human(r["reserved_incoming"]),
                human(r["scratch"]),
            ]
        ],
        ["free", "allocated", "preserved", "metadata", "incoming", "scratch"],
        out,
    )
    _sessions_table(st, out)
    inc = st["incoming"]
    if inc["sessions"]:
        out.write(f"incoming  unclaimed {human(inc['unclaimed_bytes'])}\n")
        table(
            [
                [
                    s["name"],
                    s["uid"],
                    "yes" if s["claimed"] else "no",
                    s["unclaimed_folios"],
                    human(s["unclaimed_bytes"]),
                ]
                for s in inc["sessions"]
            ],
            ["SESSION", "UID", "REATTACHED", "FOLIOS", "UNCLAIMED"],
            out,
        )
    last = st.get("last_finalize")
    if last:
        out.write(
            f"last finalize  generation {last['generation']}, {human(last['total_bytes'])} in {last.get('duration_ms', last['commit_ms'])} ms\n"
        )
    return Exit.OK


def _sessions_table(st: dict[str, Any], out: TextIO) -> None:
    sessions = st["sessions"]
    out.write(f"sessions  {len(sessions)}\n")
    if sessions:
        table(
            [
                [
                    s["name"],
                    s["uid"],
                    s["connections"],
                    "yes" if s["persistent"] else "no",
                    human(s["allocated_bytes"]),
                    human(s["preserved_bytes"]),
                    orders_text(s["preserved"]),
                ]
                for s in sessions
            ],
            ["SESSION", "UID", "CONN", "PERSISTENT", "ALLOCATED", "PRESERVED", "BY ORDER"],
            out,
        )


def cmd_sessions(args: argparse.Namespace, out: TextIO) -> int:
    with connect(args) as c:
        st = c.status()
    if args.json:
        emit_json({"sessions": st["sessions"], "incoming": st["incoming"]}, out)
        return Exit.OK
    _sessions_table(st, out)
    return Exit.OK


def cmd_finalize(args: argparse.Namespace, out: TextIO) -> int:
    events: list[dict[str, Any]] = []

    def progress(ev: dict[str, Any]) -> None:
        events.append(ev)
        if args.json:
            return
        who, status = ev.get("session"), ev.get("status")
        if who:
            reason = f": {ev['reason']}" if ev.get("reason") else ""
            verb = {
                "asked": "asked",
                "ok": "answered ok",
                "veto": "VETOED",
                "error": "failed",
                "timeout": "did not answer in time",
                "disconnected": "disconnected",
            }.get(status or "", status)
            out.write(f"  {ev['phase']:9} {who:16} {verb}{reason}\n")
        elif status == "freezing":
            out.write("  freezing preservation, writing metadata\n")
        out.flush()

    with connect(args) as c:
        if not args.json:
            st = c.status()
            n = len(st["sessions"])
            out.write(
                f"finalize: generation {st['generation'] + 1}, {n} session{'s' * (n != 1)}, FINALIZE notifiers first\n"
            )
            out.flush()
        try:
            summary = c.finalize(progress=progress, timeout=args.timeout)
        except KhoError:
            if args.json:
                emit_json({"progress": events}, sys.stderr, indent=None)
            raise
    if args.json:
        emit_json({"summary": summary, "progress": events}, out)
        return Exit.OK
    out.write(
        f"finalized: generation {summary['generation']} committed in {summary['duration_ms']} ms; "
        f"{human(summary['total_bytes'])} preserved, {summary['chunk_pages']} chunk pages, "
        f"{summary['metadata_pages']} metadata pages, FDT {summary['fdt_bytes']} bytes\n"
    )
    table(
        [[s["name"], s["uid"], human(s["bytes"])] for s in summary["sessions"]],
        ["SESSION", "UID", "PRESERVED"],
        out,
    )
    rows = [
        [o, summary["folios"][o], human(summary["bytes"][o])]
        for o in sorted(summary["folios"], key=int)
    ]
    if rows:
        table(rows, ["ORDER", "FOLIOS", "BYTES"], out)
    return Exit.OK


def _simple(
    op: Callable[[Client], dict[str, Any]], done: Callable[[dict[str, Any]], str]
) -> Callable[[argparse.Namespace, TextIO], int]:
    def run(args: argparse.Namespace, out: TextIO) -> int:
        with connect(args) as c:
            result = op(c)
        if args.json:
            emit_json(result, out)
        else:
            out.write(done(result) + "\n")
        return Exit.OK

    return run


cmd_unfreeze = _simple(
    lambda c: c.unfreeze(),
    lambda r: (
        f"unfrozen: {r['state']}; UNFREEZE notifiers answered: {', '.join(f'{k}={v}' for k, v in r['notified'].items()) or 'none subscribed'}"
    ),
)
cmd_handover = _simple(
    lambda c: c.handover(),
    lambda r: (
        f"handed over: generation {r['generation']} committed; the daemon is exiting, start the successor"
    ),
)


def cmd_release(args: argparse.Namespace, out: TextIO) -> int:
    with connect(args) as c:
        r = c.release_unclaimed(args.session, args.uid)
    if args.json:
        emit_json(r, out)
    else:
        # u<uid>,<name> (a daemon older than that field: the names alone)
        dropped = ", ".join(r.get("dropped", r["dropped_sessions"])) or "none"
        out.write(
            f"released {human(r['released_bytes'])} of unclaimed incoming memory; dropped sessions: {dropped}\n"
        )
    return Exit.OK


def cmd_drop(args: argparse.Namespace, out: TextIO) -> int:
    with connect(args) as c:
        r = c.drop_session(args.session, args.uid)
    if args.json:
        emit_json(r, out)
    else:
        out.write(
            f"dropped session {r['name']} of uid {r['uid']}: {human(r['freed_bytes'])} of its "
            f"memory and {human(r['released_bytes'])} handed over to it given back, "
            f"{r['connections_closed']} connections closed\n"
        )
    return Exit.OK


def cmd_fdt(args: argparse.Namespace, out: TextIO) -> int:
    if args.output is None and out.isatty():
        sys.stderr.write(
            "khoctl: refusing to write a binary DTB to a terminal; use -o FILE, or pipe it: "
            f"khoctl fdt {args.which} | dtc -I dtb -O dts\n"
        )
        return Exit.LOCAL
    with connect(args) as c:
        blob = c.fdt(args.which)
    if args.output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()
        return Exit.OK
    try:
        with open(args.output, "wb") as f:
            f.write(blob)
    except OSError as exc:
        sys.stderr.write(f"khoctl: cannot write {args.output}: {exc.strerror}\n")
        return Exit.LOCAL
    if not args.json:
        sys.stderr.write(f"wrote {len(blob)} bytes of DTB ({args.which}) to {args.output}\n")
    return Exit.OK


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    try:
        rep = inspect_region(
            args.region, args.base, size=args.size, backend=args.backend, pid_alive=pid_alive
        )
    except KhoError as exc:
        sys.stderr.write(f"khoctl: inspect: {exc.message}\n")
        return Exit.LOCAL
    if args.json:
        emit_json(rep.as_dict(), out)
    else:
        _print_report(rep, out)
    if not rep.accepted:
        return Exit.REJECT
    if args.expect_handover and rep.verdict != "populate":
        return Exit.NO_HANDOVER
    return Exit.OK


def _print_report(rep: Report, out: TextIO) -> None:
    out.write(f"region  {rep.path}  {human(rep.size)}  base {rep.base:#x} (from {rep.base_from})\n")
    rec = rep.record
    if rec is not None:
        out.write(
            f"record  state {rec['state']}  generation {rec['generation']}  owner pid {rec['owner_pid']}  "
            f"format v{rec['version']}  CRC ok\n"
        )
        if rec["fdt_size"]:
            out.write(
                f"        FDT {rec['fdt_size']} bytes at {rec['fdt_phys']:#x}, CRC32 {rec['fdt_crc32']:#010x}\n"
            )
        out.write(f"        scratch {rec['scratch_phys']:#x} + {human(rec['scratch_size'])}\n")
    if rep.metadata_crc32 is not None:
        out.write(
            f"metadata  CRC32 {rep.metadata_crc32:#010x} ok over every chunk page and bitmap\n"
        )
    if rep.root is not None:
        out.write(
            f"preserved  {rep.root['folios']} folios, {human(rep.root['bytes'])}  ({orders_text(rep.root['orders'])})\n"
        )
        table(
            [
                [
                    s["name"],
                    s["uid"],
                    s["folios"],
                    human(s["bytes"]),
                    orders_text(s["orders"]),
                    s["subtree_nodes"],
                ]
                for s in rep.sessions
            ],
            ["SESSION", "UID", "FOLIOS", "BYTES", "BY ORDER", "NODES"],
            out,
        )
    if rep.fdt_text:
        out.write("FDT\n")
        for line in rep.fdt_text.splitlines():
            out.write(f"  {line}\n")
    if rep.accepted:
        out.write(f"verdict: ACCEPT ({rep.verdict}): {rep.reason}\n")
    else:
        fault = f"{rep.fault}: " if rep.fault else ""
        out.write(f"verdict: REFUSE: {fault}{rep.reason}\n")


# ----------------------------------------------------------------------------- entry point


def _size(text: str) -> int:
    try:
        return parse_size(text, "--size")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="khoctl",
        description="operate a khod daemon",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--socket",
        default=None,
        help="khod's socket (default: $KHOD_SOCKET, else the packaged config's)",
    )
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout, stable keys")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the daemon")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="state, generation, region use, sessions, incoming memory")
    sub.add_parser("sessions", help="sessions with owners and preserved bytes per order")
    sub.add_parser("finalize", help="run FINALIZE notifiers, freeze and commit a handover")
    sub.add_parser("unfreeze", help="undo finalize (runs UNFREEZE notifiers)")
    sub.add_parser("handover", help="hand over (only when finalized); the daemon exits")
    p = sub.add_parser("release-unclaimed", help="free incoming memory nobody restored")
    p.add_argument("--session", help="only this incoming session")
    p.add_argument("--uid", type=int, help="only the session of this uid")
    p = sub.add_parser(
        "drop-session", help="discard a session: its memory, its tree, what was handed to it"
    )
    p.add_argument("session", metavar="NAME", help="the session's name")
    p.add_argument("--uid", type=int, help="the session's owner (default: your own uid)")
    p = sub.add_parser("fdt", help="the raw KHO DTB, outgoing or incoming")
    p.add_argument(
        "which",
        choices=("out", "in"),
        help="out: the DTB of the committed handover (after finalize); in: the one taken in",
    )
    p.add_argument("-o", "--output", help="write to FILE (a terminal gets no binary)")
    p = sub.add_parser(
        "inspect",
        help="decode and verify a region offline (read-only, no daemon): a region file, "
        "/dev/mem with --base and --size, or a DAX device",
    )
    p.add_argument("region", metavar="REGION_FILE", help="the region file, or a copy of it")
    p.add_argument(
        "--base",
        type=lambda s: int(s, 0),
        help="phys of the region's first byte (default: what the record says; "
        "required for /dev/mem)",
    )
    p.add_argument(
        "--size",
        type=_size,
        help="the region's size, e.g. 256M (required for /dev/mem: region.size of the config)",
    )
    p.add_argument(
        "--backend",
        choices=("file", "devmem", "dax"),
        help="how to open REGION_FILE (default: devmem for /dev/mem, dax for another device, "
        "else file)",
    )
    p.add_argument(
        "--expect-handover",
        action="store_true",
        help=f"exit {Exit.NO_HANDOVER:d} unless the region holds a handover to take in",
    )
    return ap


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "status": cmd_status,
    "sessions": cmd_sessions,
    "finalize": cmd_finalize,
    "unfreeze": cmd_unfreeze,
    "handover": cmd_handover,
    "release-unclaimed": cmd_release,
    "drop-session": cmd_drop,
    "fdt": cmd_fdt,
    "inspect": cmd_inspect,
}


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    args.socket = default_socket(args.socket)
    out = out or sys.stdout
    try:
        return COMMANDS[args.command](args, out)
    except Unreachable as exc:
        sys.stderr.write(f"khoctl: khod unreachable: {exc}\n")
        return Exit.UNREACHABLE
    except KhoError as exc:
        sys.stderr.write(f"khoctl: {args.command}: {exc.code}: {exc.message}\n")
        return Exit.REFUSED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.LOCAL


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
