"""The example key-value store: its semantics, its table, its log, and refusing damage.

These run the store on anonymous memory (no daemon): the table, records and
superblock are the same bytes a khod-backed store keeps in preserved folios,
and ``Store.attach`` on the same memory is exactly what a warm start does
after ``restore_folios``. The real handover is in tests/test_examples.py.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from khoexamples.kvdata import Dataset
from khoexamples.kvdb import Store
from khoexamples.kvformat import (
    HEADER,
    HEADER_CRC_AT,
    HEADER_FIELDS,
    MAX_KEY,
    MAX_VALUE,
    OPEN,
    SEALED,
    SEGMENT,
    Header,
    KvError,
)
from khoexamples.kvlog import Log
from khoexamples.kvmemory import AnonMemory
from khoexamples.kvtable import Table, slots_for

from .helpers import Daemon, daemon_running
from .test_examples import (
    STARTED,
    _no_example_left_running,  # noqa: F401 (autouse: stores are reaped too)
    finish,
    report_of,
)


def new_store(tmp: Path | None = None, slots: int = 8, **mem: int) -> Store:
    log = Log.create(str(tmp / "kv.log")) if tmp else None
    return Store.create(AnonMemory(**mem), log, slots=slots)


def refused(code: str, match: str) -> Any:
    return pytest.raises(KvError, match=f"^{code}: .*{match}")


def reattach(s: Store, log: Path | None = None) -> Store:
    """What a successor does with the same memory: seal, then attach as it is."""
    s.seal()
    if s.log is not None:
        s.log.close()
    return Store.attach(s.mem, str(log) if log else None)


# ----------------------------------------------------------------- semantics


def test_put_get_overwrite_delete() -> None:
    s = new_store()
    assert s.get(b"a") is None and len(s) == 0
    s.put(b"a", b"1")
    s.put(b"b", b"")
    assert s.get(b"a") == b"1" and s.get(b"b") == b"" and len(s) == 2
    s.put(b"a", b"22")
    assert s.get(b"a") == b"22" and len(s) == 2
    assert s.delete(b"a") is True
    assert s.get(b"a") is None and b"a" not in s and len(s) == 1
    assert s.delete(b"a") is False
    s.put(b"a", b"333")
    assert s.get(b"a") == b"333"
    st = s.stats()
    assert st["keys"] == 2 and st["dead_bytes"] > 0 and st["live_bytes"] > 0


def test_sizes_up_to_the_limits_and_bad_input_refused() -> None:
    s = new_store()
    s.put(b"k" * MAX_KEY, b"v" * MAX_VALUE)
    assert s.get(b"k" * MAX_KEY) == b"v" * MAX_VALUE
    before = s.stats()
    with refused("EINVAL", f"at most {MAX_VALUE} bytes, got {MAX_VALUE + 1}"):
        s.put(b"x", b"v" * (MAX_VALUE + 1))
    with refused("EINVAL", f"1..{MAX_KEY} bytes, got {MAX_KEY + 1}"):
        s.put(b"k" * (MAX_KEY + 1), b"v")
    with refused("EINVAL", "got 0"):
        s.put(b"", b"v")
    with refused("EINVAL", "must be bytes, got str"):
        s.put("k", b"v")  # type: ignore[arg-type]
    with refused("EINVAL", "must be bytes, got str"):
        s.put(b"k", "v")  # type: ignore[arg-type]
    with refused("EINVAL", "got 256"):
        s.get(b"k" * 256)
    assert s.stats() == before  # nothing was written


def test_the_table_grows_and_sheds_tombstones() -> None:
    s = new_store(slots=8)
    for i in range(5000):
        s.put(b"k%d" % i, b"v%d" % i)
    assert s.stats()["slots"] >= 5000 / 0.75
    for i in range(5000):
        assert s.get(b"k%d" % i) == b"v%d" % i
    # churn: deletes leave tombstones, rebuilds drop them, the table does not grow for them
    sizes = []
    for _ in range(3):
        for i in range(0, 20000, 2):
            s.put(b"t%d" % i, b"x")
            s.put(b"t%d" % (i + 1), b"x")
            assert s.delete(b"t%d" % i) and s.delete(b"t%d" % (i + 1))
        sizes.append(s.stats()["slots"])
    assert sizes[0] == sizes[1] == sizes[2] and len(s) == 5000
    assert all(s.get(b"k%d" % i) == b"v%d" % i for i in range(5000))


def test_full_store_is_a_clear_error_and_loses_nothing() -> None:
    s = new_store(max_segments=1)
    value = b"v" * 4000
    n = 0
    with refused("ENOSPC", "full: 1 data segments"):
        while True:
            s.put(b"k%d" % n, value)
            n += 1
    assert n == (SEGMENT - 48) // 4016 and len(s) == n  # 48: the META record
    assert all(s.get(b"k%d" % i) == value for i in range(n))
    s.put(b"k0", b"small")  # still fits: overwrites need room too
    assert s.delete(b"k1")


def test_full_index_is_a_clear_error() -> None:
    s = new_store(slots=8, max_index_order=0)  # one page: 256 slots, 191 keys
    with refused("ENOSPC", "order-\\d+ folio, above the largest .0."):
        for i in range(1000):
            s.put(b"k%d" % i, b"v")
    assert len(s) == 256 * 3 // 4 and s.get(b"k191") == b"v"


def test_seal_pauses_writes_until_unsealed() -> None:
    s = new_store()
    s.put(b"a", b"1")
    s.seal()
    assert Header.unpack(s.mem.superblock).state == SEALED
    with refused("EBUSY", "paused for a live update"):
        s.put(b"b", b"2")
    with refused("EBUSY", "paused"):
        s.delete(b"a")
    assert s.get(b"a") == b"1"
    s.unseal()
    assert Header.unpack(s.mem.superblock).state == SEALED  # until the next write
    s.put(b"b", b"2")
    assert Header.unpack(s.mem.superblock).state == OPEN


# ----------------------------------------------------------------- warm attach and damage


def test_attach_serves_the_same_table_without_rebuilding_it() -> None:
    s = new_store()
    for i in range(3000):
        s.put(b"k%d" % i, b"%d" % i * 3)
    for i in range(0, 3000, 3):
        s.delete(b"k%d" % i)
    w = reattach(s)
    assert len(w) == 2000 and w.stats() == {**s.stats(), "paused": False}
    assert w.table.arr.ctypes.data == s.table.arr.ctypes.data  # the same bytes, not a copy
    for i in range(3000):
        assert w.get(b"k%d" % i) == (None if i % 3 == 0 else b"%d" % i * 3)
    w.unseal()
    w.put(b"new", b"x")
    assert reattach(w).get(b"new") == b"x"


def test_attach_reads_no_key() -> None:
    """Only the superblock and the first record are read: garbage elsewhere is found per get."""
    s = new_store()
    for i in range(2000):
        s.put(b"k%d" % i, bytes(2000))
    s.seal()
    last = s.mem.segments[-1]
    last[64:] = b"\xa5" * (SEGMENT - 64)
    w = Store.attach(s.mem)
    assert len(s.mem.segments) == 2 and w.get(b"k0") == bytes(2000)
    with refused("EBADMSG", "not a PUT record|fails its crc32"):
        w.get(b"k1999")


def test_an_unsealed_table_is_refused() -> None:
    s = new_store()
    s.put(b"a", b"1")
    with refused("EBADMSG", "not sealed"):
        Store.attach(s.mem)


def rewrite_header(s: Store, **fields: int | bytes) -> None:
    """Change superblock fields and give it a valid CRC again (damage the CRC cannot see)."""
    raw = bytearray(s.mem.superblock[: HEADER.size])
    vals = list(HEADER.unpack_from(raw))
    for k, v in fields.items():
        vals[HEADER_FIELDS.index(k)] = v
    raw[:] = HEADER.pack(*vals)
    raw[HEADER_CRC_AT:] = struct.pack("<I", zlib.crc32(raw[:HEADER_CRC_AT]))
    s.mem.superblock[: HEADER.size] = raw


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"magic": b"NOTAKVSB"}, "superblock magic b'NOTAKVSB'"),
        ({"version": 7}, "superblock version 7, this store reads 1"),
        ({"state": 9}, "state 9 is neither open nor sealed"),
        ({"segment_shift": 12}, "segments of 2\\^12 bytes"),
        ({"index_slots": 1000}, "1000 index slots do not fit"),
        ({"index_slots": 1 << 20}, "index slots do not fit an order-0 folio"),
        ({"live": 10**6}, "1000000 keys and 0 tombstones in 256 slots"),
        ({"used": 1 << 40}, "outside 1 segments"),
        ({"dead_bytes": 1 << 30}, "record bytes past"),
        ({"segments": 5}, "counts 5 segments, the memory has 1"),
        ({"index_order": 3}, "order-3 index"),
        ({"uuid": b"x" * 16}, "not this store's META record"),
    ],
)
def test_a_damaged_superblock_is_refused_by_name(
    fields: dict[str, int | bytes], match: str
) -> None:
    s = new_store(slots=256)
    s.put(b"a", b"1")
    s.seal()
    rewrite_header(s, **fields)
    with refused("EBADMSG", match):
        Store.attach(s.mem)


def test_a_flipped_superblock_bit_fails_the_crc() -> None:
    s = new_store()
    s.put(b"a", b"1")
    s.seal()
    s.mem.superblock[40] ^= 0x10
    with refused("EBADMSG", "superblock crc32 0x[0-9a-f]{8} does not match its bytes"):
        Store.attach(s.mem)


def test_a_damaged_record_is_refused_not_served() -> None:
    s = new_store()
    s.put(b"a", b"hello world")
    at = bytes(s.mem.segments[0]).index(b"hello world")
    s.mem.segments[0][at] ^= 1
    with refused("EBADMSG", "record of key b'a' at 0x[0-9a-f]+ fails its crc32"):
        s.get(b"a")


# ----------------------------------------------------------------- the log and the cold start


def test_replay_rebuilds_what_was_written(tmp_path: Path) -> None:
    s = new_store(tmp_path)
    rng = random.Random(5)
    for i in range(3000):
        s.put(b"k%d" % i, rng.randbytes(i % 700))
    for i in range(0, 3000, 4):
        s.delete(b"k%d" % i)
    for i in range(1, 3000, 5):
        s.put(b"k%d" % i, b"again")
    want = {b"k%d" % i: s.get(b"k%d" % i) for i in range(3000)}
    s.close()
    c = Store.replay(AnonMemory(), str(tmp_path / "kv.log"))
    assert {k: c.get(k) for k in want} == want and c.torn_at is None
    assert c.stats()["live_bytes"] == s.h.live_bytes and c.stats()["dead_bytes"] == s.h.dead_bytes
    c.put(b"after", b"replay")  # a cold-started store goes on writing its log
    c.close()
    again = Store.replay(AnonMemory(), str(tmp_path / "kv.log"))
    assert again.get(b"after") == b"replay"
    assert len(again) == sum(v is not None for v in want.values()) + 1


def test_replay_cuts_a_torn_tail_and_refuses_damage_before_it(tmp_path: Path) -> None:
    log = tmp_path / "kv.log"
    s = new_store(tmp_path)
    for i in range(600):  # more than one segment
        s.put(b"k%d" % i, bytes(4000))
    s.put(b"last", b"x" * 100)
    s.close()
    size = log.stat().st_size
    with open(log, "r+b") as f:
        f.truncate(size - 50)  # the last record torn
    c = Store.replay(AnonMemory(), str(log))
    assert c.torn_at is not None and c.get(b"last") is None and len(c) == 600
    assert log.stat().st_size == c.torn_at  # cut, so appends follow the good records
    c.put(b"last", b"y")
    c.close()
    assert Store.replay(AnonMemory(), str(log)).get(b"last") == b"y"
    with open(log, "r+b") as f:
        f.seek(SEGMENT // 2)
        f.write(b"\xff" * 16)
    with refused("EBADMSG", "the record at 0x[0-9a-f]+ (fails its crc32|has type)"):
        Store.replay(AnonMemory(), str(log))


def test_logs_are_not_mixed_up(tmp_path: Path) -> None:
    a = new_store(tmp_path)
    a.put(b"a", b"1")
    a.close()
    with refused("EEXIST", "already holds .* bytes: replay it, or remove it"):
        Log.create(str(tmp_path / "kv.log"))
    b = Store.create(AnonMemory(), Log.create(str(tmp_path / "other.log")))
    b.put(b"b", b"2")
    b.seal()
    with refused("EBADMSG", "belongs to another store"):
        Store.attach(b.mem, str(tmp_path / "kv.log"))
    (tmp_path / "junk").write_bytes(b"not a log at all" * 10)
    with refused("EBADMSG", "does not start with a kvstore META record"):
        Store.replay(AnonMemory(), str(tmp_path / "junk"))


def test_a_warm_start_brings_a_lagging_log_up_to_date(tmp_path: Path) -> None:
    log = tmp_path / "kv.log"
    s = new_store(tmp_path)
    for i in range(500):
        s.put(b"k%d" % i, bytes(3000))
    s.seal()
    s.log.close()  # type: ignore[union-attr]
    os.truncate(log, 4096)  # as if the page cache was lost with the old kernel
    w = Store.attach(s.mem, str(log))
    w.unseal()
    w.put(b"new", b"x")
    w.close()
    c = Store.replay(AnonMemory(), str(log))
    assert len(c) == 501 and c.get(b"k499") == bytes(3000) and c.get(b"new") == b"x"


# ----------------------------------------------------------------- the table against a model


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "put", "delete", "get", "warm"]),
            st.integers(0, 40),
            st.binary(max_size=300),
        ),
        max_size=300,
    )
)
def test_store_matches_a_dict(ops: list[tuple[str, int, bytes]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        s = new_store(Path(d), slots=8)
        model: dict[bytes, bytes] = {}
        for op, k, v in ops:
            key = b"key%d" % k
            if op == "put":
                s.put(key, v)
                model[key] = v
            elif op == "delete":
                assert s.delete(key) == (model.pop(key, None) is not None)
            elif op == "get":
                assert s.get(key) == model.get(key)
            else:
                s = reattach(s, Path(d) / "kv.log")
                s.unseal()
            assert len(s) == len(model)
        assert {b"key%d" % k: s.get(b"key%d" % k) for k in range(41)} == {
            b"key%d" % k: model.get(b"key%d" % k) for k in range(41)
        }
        s.close()
        cold = Store.replay(AnonMemory(), str(Path(d) / "kv.log"))
        assert {k: cold.get(k) for k in model} == model and len(cold) == len(model)


def test_seeded_random_churn_matches_a_dict() -> None:
    rng = random.Random(11)
    s = new_store(slots=8)
    model: dict[bytes, bytes] = {}
    for _ in range(30000):
        key = b"%d" % rng.randrange(3000)
        r = rng.random()
        if r < 0.5:
            value = rng.randbytes(rng.randrange(64))
            s.put(key, value)
            model[key] = value
        elif r < 0.8:
            assert s.delete(key) == (model.pop(key, None) is not None)
        else:
            assert s.get(key) == model.get(key)
    assert len(s) == len(model)
    assert all(s.get(k) == v for k, v in model.items())
    w = reattach(s)
    assert all(w.get(b"%d" % i) == model.get(b"%d" % i) for i in range(3000))


@given(n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1), narrow=st.booleans())
def test_fill_places_every_entry_on_its_probe_path(n: int, seed: int, narrow: bool) -> None:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(2, 2**63, n, dtype=np.uint64)
    if narrow:  # many equal home slots and equal hashes: long clusters
        n = min(n, 300)
        hashes = (hashes[:n] % 64 + 2).astype(np.uint64)
    locs = np.arange(n, dtype=np.uint64) * 8
    slots = slots_for(n)
    t = Table(memoryview(bytearray(slots * 16)), slots)
    t.fill(hashes, locs)
    assert t.live == n
    for h, loc in zip(hashes.tolist(), locs.tolist(), strict=True):
        i, _ = t.find(h, lambda at, loc=loc: at == loc)
        assert i >= 0 and t.loc(i) == loc
    got_h, got_l = t.entries()
    assert sorted(zip(got_l.tolist(), got_h.tolist(), strict=True)) == list(
        zip(locs.tolist(), hashes.tolist(), strict=True)
    )
    assert int(t.full_after(0)) == 0


# ----------------------------------------------------------------- through khod, as processes


def kv(sock: str, *args: str, log: Path) -> subprocess.Popen[str]:
    """``python -m khoexamples.kvstore``, with pipes for its requests, reports and messages."""
    p = subprocess.Popen(
        [sys.executable, "-m", "khoexamples.kvstore", "--log", str(log), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KHOD_SOCKET": sock},
    )
    STARTED.append(p)
    return p


DATA = ("--keys", "1500", "--value-size", "0-8192", "--churn")


def handover(d: Daemon) -> None:
    with d.client() as op:
        op.finalize()
        op.handover()
    assert d.wait() == 0


def test_every_key_survives_two_handovers(shm_dir: Path) -> None:
    log = shm_dir / "kv.log"
    live = Dataset(1500, 0, 8192, churn=True).live_keys()
    with daemon_running(shm_dir) as d:
        p = kv(d.socket, *DATA, log=log)
        assert report_of(p)["mode"] == "start"
        handover(d)
        rc, err = finish(p)
        assert rc == 0 and f"FINALIZE: writes paused, table of {live} keys sealed" in err
    for _ in range(2):  # the successor preserves it again: it survives the next one too
        with daemon_running(shm_dir) as d:
            p = kv(d.socket, "--once", *DATA, log=log)
            r = report_of(p)
            assert finish(p)[0] == 0
            assert r["mode"] == "resume" and r["keys"] == live
            assert r["keys_served"] == live and r["keys_wrong"] == 0 and r["keys_extra"] == 0
            assert r["warm_start_ms"] > 0 and r["cold_start_ms"] > 0
            with d.client() as op:
                (s,) = op.status()["sessions"]
            assert s["preserved_bytes"] == s["allocated_bytes"] >= r["segments"] * (2 << 20)
            handover(d)


def flip_superblock_byte(d: Daemon, at: int) -> None:
    """Damage the preserved superblock in the session's memory file, as a stray write would."""
    with d.client("kvstore", persistent=True) as c:
        sb = struct.unpack_from("<Q", c.get_prop("/kvstore", "folios"))[0]
        base = c.region().base
    path = d.dir / "region.sessions" / f"{os.getuid()}.kvstore"
    with open(path, "r+b") as f:
        f.seek(sb - base + at)
        byte = f.read(1)
        f.seek(sb - base + at)
        f.write(bytes([byte[0] ^ 0x40]))


def test_a_damaged_table_is_refused_after_a_handover(shm_dir: Path) -> None:
    log = shm_dir / "kv.log"
    with daemon_running(shm_dir) as d:
        p = kv(d.socket, "--keys", "300", log=log)
        report_of(p)
        handover(d)
        finish(p)
    with daemon_running(shm_dir) as d:
        flip_superblock_byte(d, 48)  # the key count
        p = kv(d.socket, "--once", "--keys", "300", log=log)
        rc, err = finish(p)
        assert rc == 3
        assert "refused to start: EBADMSG: superblock crc32" in err and "does not match" in err


def test_a_store_restarted_without_a_handover_reattaches_its_memory(shm_dir: Path) -> None:
    log = shm_dir / "kv.log"
    with daemon_running(shm_dir) as d:
        p = kv(d.socket, "--keys", "400", log=log)
        report_of(p)
        p.send_signal(signal.SIGTERM)  # a clean stop seals the table
        assert finish(p)[0] == 0
        with d.client() as op:
            before = op.status()["sessions"][0]["preserved_bytes"]
        p = kv(d.socket, "--keys", "400", log=log)
        r = report_of(p)
        assert r["mode"] == "resume" and r["keys_served"] == 400 and r["keys_wrong"] == 0
        p.send_signal(signal.SIGTERM)
        assert finish(p)[0] == 0
        p = kv(d.socket, "--serve", log=log)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write('{"op": "open"}\n{"op": "put", "key": "new", "value": "AQI="}\n')
        p.stdin.flush()
        lines = [json.loads(p.stdout.readline()) for _ in range(3)]
        assert lines[1]["mode"] == "warm" and lines[2] == {"ok": True}
        p.kill()  # a crash after a write leaves the table open: the next start replays the log
        finish(p)
        p = kv(d.socket, "--keys", "400", log=log)
        r = report_of(p)
        assert r["mode"] == "cold" and r["keys"] == 401  # the acknowledged put was in the log
        p.send_signal(signal.SIGTERM)
        _, err = finish(p)
        assert "was not sealed" in err and "giving that memory back" in err
        with d.client() as op:
            assert op.status()["sessions"][0]["preserved_bytes"] == before  # nothing leaked


def test_serve_answers_json_lines(shm_dir: Path) -> None:
    log = shm_dir / "kv.log"
    with daemon_running(shm_dir) as d:
        p = kv(d.socket, "--serve", "--keys", "50", log=log)
        assert p.stdin is not None and p.stdout is not None

        def call(**req: Any) -> dict[str, Any]:
            p.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
            return json.loads(p.stdout.readline())  # type: ignore[union-attr,no-any-return]

        assert json.loads(p.stdout.readline()) == {"ready": True}
        assert call(op="get", key="a")["error"]["code"] == "EINVAL"  # not open yet
        opened = call(op="open")
        assert opened["open_ms"] >= opened["hello_ms"] > 0
        assert (opened["ok"], opened["mode"], opened["keys"]) == (True, "new", 0)
        b64 = base64.b64encode
        assert call(op="put", key="a", value=b64(b"1").decode()) == {"ok": True}
        assert call(op="get", key="a") == {"ok": True, "value": b64(b"1").decode()}
        big = b64(bytes(8193)).decode()
        err = call(op="put", key="b", value=big)["error"]
        assert err == {"code": "EINVAL", "message": "a value has at most 8192 bytes, got 8193"}
        assert call(op="put", key="b", value="not base64!")["error"]["code"] == "EINVAL"
        assert call(op="delete", key="a") == {"ok": True, "deleted": True}
        assert call(op="get", key="a") == {"ok": True, "value": None}
        assert call(op="load")["keys"] == 50
        assert call(op="verify") == {
            "ok": True,
            "keys_served": 50,
            "keys_wrong": 0,
            "keys_extra": 0,
        }
        assert call(op="frobnicate")["error"]["message"] == "unknown op 'frobnicate'"
        assert call(op="quit") == {"ok": True}
        assert finish(p)[0] == 0
    # the same log, without khod: the cold start
    p = kv("/nonexistent", "--serve", "--cold", "--keys", "50", log=log)
    assert json.loads(p.stdout.readline()) == {"ready": True}  # type: ignore[union-attr]
    p.stdin.write('{"op": "open"}\n{"op": "verify"}\n{"op": "quit"}\n')  # type: ignore[union-attr]
    p.stdin.flush()  # type: ignore[union-attr]
    lines = [json.loads(x) for x in p.stdout]  # type: ignore[union-attr]
    assert lines[0]["mode"] == "cold" and lines[0]["keys"] == 50
    assert lines[1] == {"ok": True, "keys_served": 50, "keys_wrong": 0, "keys_extra": 0}
    assert finish(p)[0] == 0


def test_an_index_without_empty_slots_is_refused_not_looped_over() -> None:
    s = new_store(slots=8)
    s.put(b"a", b"1")
    s.seal()
    np.frombuffer(s.mem.index, dtype=np.uint64)[:16] = 12345  # every slot taken, no key
    w = Store.attach(s.mem)
    with refused("EBADMSG", "no empty slot in 8"):
        w.get(b"b")


def serve_and_put_k(socket: str, log: Path) -> subprocess.Popen[str]:
    """A serving store, opened, with key k put (and left serving)."""
    p = kv(socket, "--serve", log=log)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write('{"op": "open"}\n{"op": "put", "key": "k", "value": "AQI="}\n')
    p.stdin.flush()
    assert [json.loads(p.stdout.readline()).get("ok") for _ in range(3)] == [None, True, True]
    return p


def serve_and_get_k(socket: str, log: Path) -> tuple[subprocess.Popen[str], list[dict[str, Any]]]:
    """A serving store that opens, gets key k and quits: its replies to open and get."""
    p = kv(socket, "--serve", log=log)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write('{"op": "open"}\n{"op": "get", "key": "k"}\n{"op": "quit"}\n')
    p.stdin.flush()
    return p, [json.loads(x) for x in p.stdout][1:]


def test_a_handover_of_a_crashed_writer_replays_the_log(shm_dir: Path) -> None:
    """Not sealed: the store crashed after a write, before the finalize. Nothing is lost."""
    log = shm_dir / "kv.log"
    with daemon_running(shm_dir) as d:
        p = serve_and_put_k(d.socket, log)
        p.kill()
        finish(p)
        handover(d)  # the session is persistent: its memory goes over, unsealed
    with daemon_running(shm_dir) as d:
        p, lines = serve_and_get_k(d.socket, log)
        assert lines[0]["mode"] == "cold" and lines[1] == {"ok": True, "value": "AQI="}
        _, err = finish(p)
        assert "was not sealed" in err
        with d.client() as op:
            (s,) = op.status()["sessions"]
        assert s["allocated_bytes"] == s["preserved_bytes"]  # the old memory was given back


def test_memory_restored_by_a_process_that_died_is_attached_as_it_is(shm_dir: Path) -> None:
    log = shm_dir / "kv.log"
    with daemon_running(shm_dir) as d:
        p = kv(d.socket, "--keys", "200", log=log)
        report_of(p)
        handover(d)
        finish(p)
    with daemon_running(shm_dir) as d:
        with d.client("kvstore", persistent=True) as c:  # restores, then goes away
            raw = c.get_prop("/kvstore", "folios")
            c.restore_folios(np.frombuffer(raw, dtype="<u8"))
        p = kv(d.socket, "--once", "--keys", "200", log=log)
        r = report_of(p)
        assert finish(p)[0] == 0
        assert r["mode"] == "resume" and r["keys_served"] == 200 and r["keys_wrong"] == 0


def test_a_damaged_log_is_refused_and_leaves_no_memory_behind(shm_dir: Path) -> None:
    log = shm_dir / "kv.log"
    with daemon_running(shm_dir) as d:
        p = kv(d.socket, "--keys", "2000", "--value-size", "2000", log=log)
        report_of(p)
        with d.client() as op:
            op.drop_session("kvstore")  # the memory is gone: the next start replays the log
        p.kill()
        finish(p)
        with open(log, "r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * 8)
        p = kv(d.socket, "--keys", "2000", "--value-size", "2000", log=log)
        rc, err = finish(p)
        assert rc == 3 and "refused to start: EBADMSG: log" in err and "fails its crc32" in err
        with d.client() as op:
            (s,) = op.status()["sessions"]
        assert s["allocated_bytes"] == 0 and s["preserved_bytes"] == 0
        with d.client("kvstore", persistent=True) as c:
            assert c.get_node("/", tree="out").children == []


def test_sigterm_stops_a_serving_store_cleanly(shm_dir: Path) -> None:
    log = shm_dir / "kv.log"
    with daemon_running(shm_dir) as d:
        p = serve_and_put_k(d.socket, log)
        p.send_signal(signal.SIGTERM)
        assert finish(p)[0] == 0
        p, lines = serve_and_get_k(d.socket, log)
        assert lines[0]["mode"] == "warm" and lines[1] == {"ok": True, "value": "AQI="}
        assert finish(p)[0] == 0


def test_a_full_region_is_a_clear_error_and_the_store_goes_on(shm_dir: Path) -> None:
    log = shm_dir / "kv.log"
    with daemon_running(shm_dir) as d:  # a 256 MiB region: the data set does not fit
        p = kv(d.socket, "--serve", "--keys", "70000", "--value-size", "4000", log=log)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write('{"op": "open"}\n{"op": "load"}\n{"op": "get", "key": "key-0000000001"}\n')
        p.stdin.write('{"op": "stats"}\n{"op": "quit"}\n')
        p.stdin.flush()
        lines = [json.loads(x) for x in p.stdout][1:]
        assert finish(p)[0] == 0
        assert lines[1]["ok"] is False and lines[1]["error"]["code"] == "ENOMEM"
        assert lines[2]["ok"] is True and base64.b64decode(lines[2]["value"])[:8] == bytes(
            [1, 0, 0, 0, 0, 0, 0, 0]
        )
        kept = lines[3]["keys"]
        assert 30000 < kept < 70000
    c = Store.replay(AnonMemory(), str(log))  # the log holds exactly what was acknowledged
    assert len(c) == kept
