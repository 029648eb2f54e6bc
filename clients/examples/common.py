"""Shared by the example workloads: connecting patiently, and reporting to the demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from khoclient import Client, KhoError


def base_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument(
        "--socket", default=None, help="khod's socket (default: $KHOD_SOCKET or the packaged one)"
    )
    ap.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for the daemon to come up"
    )
    ap.add_argument(
        "--once",
        action="store_true",
        help="exit after the handover (start) or after verifying (resume)",
    )
    return ap


def connect(socket: str | None, session: str, wait: float) -> Client:
    """Connect and say hello, retrying while the daemon (or its successor) starts."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return Client(socket, session=session, persistent=True)
        except KhoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def report(**fields: Any) -> None:
    """One machine-readable line for the demo, one readable line for people."""
    print("report " + json.dumps(fields, sort_keys=True), flush=True)


def say(role: str, text: str) -> None:
    print(f"[{role}] {text}", file=sys.stderr, flush=True)
