"""A crash at any named point leaves either a complete handover or none.

Every member of :class:`FaultPoint` is killed at by one of the tests below,
and each asserts the daemon said it reached that point before dying.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from khoclient import KhoError

from khod.faults import FaultPoint
from khod.kho.handover import CommitStep
from khod.kho.record import RecordState, decode_record

from .helpers import Daemon, daemon_running, pattern, sha, start_daemon

F = FaultPoint
BEFORE_COMMIT = [F.FINALIZE_NOTIFIED, F.SERIALIZE, F.FDT_WRITTEN, F.FLUSHED]
AFTER_COMMIT = [F.COMMITTED, F.HANDOVER]
POPULATE = [F.POPULATE_VALIDATED, F.POPULATE_RESERVED, F.READY]
TAKE_OVER = [F.TAKE_OVER]


def test_every_fault_point_is_covered() -> None:
    assert sorted(BEFORE_COMMIT + AFTER_COMMIT + POPULATE + TAKE_OVER) == sorted(FaultPoint)
    assert {str(s) for s in CommitStep} <= {str(p) for p in FaultPoint}


def record_state(d: Path) -> RecordState:
    with open(d / "region", "rb") as f:
        return decode_record(f.read(128)).state


def prepare(d: Daemon) -> dict[int, str]:
    """Two sessions with data; returns phys -> digest of what was preserved."""
    expect = {}
    with d.client("vmm", persistent=True) as vmm, d.client("db", persistent=True) as db:
        for client, order in ((vmm, 9), (db, 0), (db, 0)):
            f = client.alloc_folio(order)
            view = client.map(f)
            view[:] = pattern("x", f.phys, f.size)
            expect[f.phys] = sha(view)
            del view
            client.preserve_folio(f)
    return expect


def verify_complete(d: Path, expect: dict[int, str]) -> None:
    with daemon_running(d) as succ:
        assert "mode=populate" in succ.logs()
        with succ.client("vmm") as vmm, succ.client("db") as db:
            for phys, digest in expect.items():
                for c in (vmm, db):
                    try:
                        f = c.restore_folio(phys)
                    except KhoError:
                        continue
                    view = c.map(f)
                    assert sha(view) == digest
                    del view
                    break
                else:
                    pytest.fail(f"folio {phys:#x} was not handed over")
        assert succ.stop() == 0


def finalize_and_hand_over(d: Daemon) -> None:
    try:
        with d.client(timeout=20) as op:
            op.finalize()
            op.handover()
    except KhoError:
        pass  # the daemon died under us: that is the point


@pytest.mark.parametrize("point", BEFORE_COMMIT)
def test_crash_before_commit_leaves_no_handover(shm_dir: Path, point: FaultPoint) -> None:
    d = start_daemon(shm_dir, env={"KHOD_FAULT": point})
    prepare(d)
    finalize_and_hand_over(d)
    assert d.wait() == -signal.SIGKILL
    assert f"fault point {str(point)!r}" in d.logs()
    assert record_state(shm_dir) is RecordState.LIVE
    # no handover: the successor will not guess; it refuses until told to reset
    succ = start_daemon(shm_dir, wait_ready=False)
    assert succ.wait() == 4


@pytest.mark.parametrize("point", AFTER_COMMIT)
def test_crash_after_commit_leaves_a_complete_handover(shm_dir: Path, point: FaultPoint) -> None:
    d = start_daemon(shm_dir, env={"KHOD_FAULT": point})
    expect = prepare(d)
    finalize_and_hand_over(d)
    assert d.wait() == -signal.SIGKILL
    assert f"fault point {str(point)!r}" in d.logs()
    assert record_state(shm_dir) is RecordState.HANDOVER
    verify_complete(shm_dir, expect)


@pytest.mark.parametrize("point", POPULATE)
def test_crash_during_populate_keeps_the_handover(shm_dir: Path, point: FaultPoint) -> None:
    with daemon_running(shm_dir) as d:
        expect = prepare(d)
        finalize_and_hand_over(d)
        assert d.wait() == 0
    crashed = start_daemon(shm_dir, env={"KHOD_FAULT": point}, wait_ready=False)
    assert crashed.wait() == -signal.SIGKILL
    assert f"fault point {str(point)!r}" in crashed.logs()
    assert record_state(shm_dir) is RecordState.HANDOVER
    verify_complete(shm_dir, expect)


@pytest.mark.parametrize("point", TAKE_OVER)
def test_crash_at_the_take_over_keeps_the_handover(shm_dir: Path, point: FaultPoint) -> None:
    with daemon_running(shm_dir) as d:
        expect = prepare(d)
        finalize_and_hand_over(d)
        assert d.wait() == 0
    succ = start_daemon(shm_dir, env={"KHOD_FAULT": point})
    with succ.client("vmm") as vmm:  # reattaching and restoring leave the handover whole
        vmm.ping()
    with succ.client("db") as db:
        folio = db.restore_folio(min(expect))
        with pytest.raises(KhoError):
            db.free_folio(folio)  # freeing handed-over memory takes the handover over
    assert succ.wait() == -signal.SIGKILL
    assert f"fault point {str(point)!r}" in succ.logs()
    assert record_state(shm_dir) is RecordState.HANDOVER
    verify_complete(shm_dir, expect)
