"""Seeded SIGKILLs of the daemon at random moments: never a lost acknowledged finalize.

One workload lives through many daemons. Each daemon life: start (maybe
populating), reattach and restore everything handed over and check every
byte, a preserve storm, sometimes a finalize and an unfreeze, a finalize,
a handover. In each life a seeded choice picks one of those phases and a
delay inside it, and the daemon is killed there with SIGKILL. After every
start the test checks what the daemon found against what may be there:
the last handover whose finalize was acknowledged, or -- when the kill
landed while a finalize or an unfreeze was in flight -- the one it was
making. Anything else, or a start that refuses the region while an
acknowledged handover exists, fails the test.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from khoclient import Client, KhoError

from .helpers import Daemon, sha, start_daemon, write_config

SEED = 20261127
MIN_KILLS = 50
BUDGET_S = 110  # the whole test, so that CI stays quick
PHASES = ("start", "restore", "storm", "finalize", "unfreeze", "handover")

Handover = frozenset[tuple[int, int, str]]  # (phys, order, digest) of every folio


@dataclass
class Model:
    """What the region may hold: every candidate handover, None for none."""

    candidates: set[Handover | None] = field(default_factory=lambda: {None})
    pending: Handover | None = None  # the handover the running daemon populated from
    preserved: dict[int, tuple[int, str]] = field(default_factory=dict)  # phys -> (order, digest)

    def current(self) -> Handover:
        return frozenset((p, o, d) for p, (o, d) in self.preserved.items())


@dataclass
class Tally:
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    populated: int = 0
    formatted: int = 0
    resets: int = 0
    verified_folios: int = 0


class Killer:
    """SIGKILL a daemon after a delay, unless cancelled first."""

    def __init__(self, daemon: Daemon, delay: float) -> None:
        self.daemon = daemon
        self.timer = threading.Timer(delay, self._kill)
        self.fired = False
        self.timer.start()

    def _kill(self) -> None:
        if self.daemon.proc.poll() is None:
            self.fired = True
            self.daemon.proc.send_signal(signal.SIGKILL)

    def cancel(self) -> None:
        self.timer.cancel()


def wait_ready_or_exit(d: Daemon, timeout: float = 20) -> int | None:
    """None once the daemon serves; its exit status if it exited first."""
    deadline = time.monotonic() + timeout
    while "event=ready" not in d.logs():
        status = d.proc.poll()
        if status is not None:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(d.logs())
        time.sleep(0.005)
    return None


def incoming_of(c: Client, model: Model) -> Handover | None:
    """Restore everything handed over to the session, check its bytes, preserve it again."""
    if not c.hello_info["incoming"]:
        return None
    candidates = [h for h in model.candidates if h is not None]
    assert candidates, "a handover was populated where none may be"
    phys = sorted({p for h in candidates for p, _, _ in h})
    region = c.region()
    view = c.map_phys(region.base, region.size)
    got = []
    for p in phys:
        try:
            f = c.restore_folio(p)
        except KhoError as exc:
            if exc.code == "ENOENT":
                continue  # not in this candidate
            raise
        got.append(
            (f.phys, f.order, sha(view[f.phys - region.base : f.phys - region.base + f.size]))
        )
    del view
    handed = frozenset(got)
    assert c.status()["incoming"]["unclaimed_bytes"] == 0, "more was handed over than expected"
    for p, o, _ in handed:
        c.preserve_folio(p, o)
    return handed


def storm(c: Client, model: Model, rng: random.Random) -> None:
    """Allocate, fill and preserve a few dozen folios, one request at a time."""
    region = c.region()
    for _ in range(rng.randrange(16, 40)):
        order = rng.choice((0, 0, 0, 2))
        f = c.alloc_folio(order)
        view = c.map(f)
        view[:] = rng.randbytes(f.size)
        digest = sha(view)
        del view
        c.preserve_folio(f)
        model.preserved[f.phys] = (order, digest)
    assert region.size


def life(
    shm_dir: Path, model: Model, tally: Tally, plan: random.Random, data: random.Random, cfg: Path
) -> None:
    """One daemon, from start to its handover or its death.

    ``plan`` draws where to kill and which path to take, ``data`` the folios:
    two generators, so the kills of a seed do not depend on how far earlier
    lives got.
    """
    phase = plan.choice(PHASES)
    delay = plan.uniform(0.0, 0.03)
    if phase == "handover":  # a daemon is gone within a few ms of its handover (no teardown)
        delay *= 0.15
    start_delay = plan.uniform(0.05, 0.6)
    detour = phase == "unfreeze" or plan.random() < 0.3
    d = start_daemon(shm_dir, config=cfg, wait_ready=False)
    killers = [Killer(d, start_delay)] if phase == "start" else []
    status = wait_ready_or_exit(d)
    if status == 4:  # the region was live under a daemon that died
        assert None in model.candidates, f"an acknowledged handover was refused:\n{d.logs()}"
        tally.resets += 1
        d = start_daemon(shm_dir, "--reset", config=cfg)
        status = None
    if status is not None:
        assert killers and killers[0].fired, f"khod exited {status}:\n{d.logs()}"
        tally.kills["start"] += 1
        return

    def arm(p: str) -> None:
        if p == phase:
            killers.append(Killer(d, delay))

    try:
        with Client(d.socket, session="w", persistent=True, timeout=20) as c:
            arm("restore")
            handed = incoming_of(c, model)
            assert handed in model.candidates, "the daemon found a handover nobody made"
            # what this daemon holds preserved: exactly what it was handed (and re-preserved)
            model.preserved = {p: (o, dg) for p, o, dg in handed or ()}
            if handed is None:
                tally.formatted += 1
            else:
                tally.populated += 1
                tally.verified_folios += len(handed)
            model.pending = handed
            model.candidates = {handed}
            arm("storm")
            storm(c, model, data)
            with Client(d.socket, timeout=20) as op:
                if detour:
                    attempt = model.current()
                    model.candidates = {model.pending, attempt}
                    arm("finalize")
                    op.finalize()
                    model.candidates = {attempt, model.pending}
                    arm("unfreeze")
                    op.unfreeze()
                    model.candidates = {model.pending}
                attempt = model.current()
                model.candidates = {model.pending, attempt}
                arm("finalize")
                op.finalize()
                model.candidates = {attempt}
                arm("handover")
                op.handover()
        status = d.wait()
        assert status in (0, -signal.SIGKILL), d.logs()
        if status == -signal.SIGKILL:
            tally.kills[phase] += 1
    except KhoError:
        assert d.wait() == -signal.SIGKILL, d.logs()
        tally.kills[phase] += 1
    finally:
        for k in killers:
            k.cancel()
        if d.proc.poll() is None:
            d.proc.kill()
            d.wait()


@pytest.mark.slow
def test_seeded_kills_never_lose_an_acknowledged_finalize(shm_dir: Path) -> None:
    plan, data = random.Random(SEED), random.Random(SEED + 1)
    cfg = write_config(shm_dir, region={"size": "64M", "scratch_size": "1M"})
    model, tally = Model(), Tally()
    t0 = time.monotonic()
    while sum(tally.kills.values()) < MIN_KILLS:
        assert time.monotonic() - t0 < BUDGET_S, f"only {tally} within {BUDGET_S} s"
        life(shm_dir, model, tally, plan, data, cfg)
    print(f"chaos: {sum(tally.kills.values())} kills in {time.monotonic() - t0:.0f} s: {tally}")
    assert tally.populated > 10 and all(tally.kills[p] for p in PHASES)
