"""Structured logs: one line per event with level and event, logfmt or JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

from khod.log import Log

from .helpers import daemon_running, write_config


def test_logfmt_and_json_lines() -> None:
    buf = io.StringIO()
    log = Log("info", stream=buf)
    log.debug("hidden")
    log.warning("finalize.aborted", reason='veto from "vmm": busy', session="vmm", code=None)
    line = buf.getvalue().strip()
    assert "\n" not in line
    assert " level=warning event=finalize.aborted " in line
    assert (
        'reason="veto from \\"vmm\\": busy"' in line
        and "session=vmm" in line
        and "code=" not in line
    )
    buf = io.StringIO()
    Log("debug", "json", stream=buf).error("start.refused", reason="crc_mismatch", code="EPROTO")
    rec = json.loads(buf.getvalue())
    assert rec["level"] == "error" and rec["event"] == "start.refused" and rec["code"] == "EPROTO"


def test_daemon_logs_are_one_event_per_line(shm_dir: Path) -> None:
    cfg = write_config(shm_dir, logging={"format": "json"})
    with daemon_running(shm_dir, config=cfg) as d:
        with d.client("s") as c:
            c.ping()
        assert d.stop() == 0
    events = [json.loads(line)["event"] for line in d.logs().splitlines() if line.startswith("{")]
    assert events[:3] == ["listen", "start", "ready"]  # sockets are bound before start-up writes
    assert "session.hello" in events and "daemon.stopping" in events and events[-1] == "exit"
