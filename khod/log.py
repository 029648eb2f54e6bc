"""Structured logging: one line per event on stderr (journald picks it up).

``ts=... level=info event=finalize.vetoed session=vmm reason="busy"`` --
logfmt by default, or one JSON object per line. Every refusal, veto,
timeout, abort and reset is logged with its reason by the callers.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _logfmt_value(v: Any) -> str:
    s = str(v)
    if s and not any(c in s for c in ' "=\\\n\t'):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Log:
    def __init__(
        self, level: str = "info", fmt: str = "logfmt", stream: TextIO | None = None
    ) -> None:
        self.threshold = LEVELS[level]
        self.fmt = fmt
        self.stream = stream

    def event(self, level: str, event: str, **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        record = {"ts": ts, "level": level, "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        if self.fmt == "json":
            import json  # only for JSON logs: logfmt starts without it

            line = json.dumps(record, default=str)
        else:
            line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in record.items())
        out = self.stream or sys.stderr
        out.write(line + "\n")
        out.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self.event("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.event("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.event("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.event("error", event, **fields)
