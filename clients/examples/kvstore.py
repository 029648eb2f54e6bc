"""A key-value store whose index and data live in preserved memory, warm in milliseconds.

    python -m khoexamples.kvstore [--keys N] [--value-size 400 | 200-4000] [--churn] [--once]
    python -m khoexamples.kvstore --serve [--cold]     # JSON lines on stdin/stdout

The store (:mod:`kvdb`; docs/kvstore.md) keeps a hash table of 16-byte
slots and its records in khod folios (a superblock page, one index folio,
2 MiB data segments) and appends every record to an on-disk log as well. At
start it opens the first that applies:

* **warm**: the session's tree names the store's folios -- its outgoing
  tree (an earlier process of the store stopped) or its incoming one (a
  handover). ``restore_folios`` them if handed over, map them, check the
  superblock, serve. Nothing is read per key, nothing copied, nothing
  rebuilt; the folios are preserved again for the next update after the
  first request is answered. A table its writer left open (a crash) is
  given back and the log replayed;
* **cold**: the log holds records. Replay it into new preserved memory;
* **new**: an empty store (then ``--keys`` loads the data set of :mod:`kvdata`).

``--cold`` (with ``--serve``) replays the log into anonymous memory without
khod at all: the store as it would start without KHO, the baseline. A warm
start measures its own cold start the same way and reports both.

Subscribed to the notifiers: FINALIZE seals the table (writes pause, the
superblock is marked sealed with a fresh CRC); UNFREEZE lets writes go on;
a clean stop seals too. A warm start refuses (exit status 3) a table that
is damaged, naming the fault.

``--serve`` answers one JSON object per line on stdin, after printing
``{"ready": true}``: ``open``, ``get``/``put``/``delete`` (``key`` a
string, ``value`` base64), ``load`` and ``verify`` (the data set the
options name), ``stats``, ``sync``, ``quit``. Replies are ``{"ok": true,
...}`` or ``{"ok": false, "error": {"code", "message"}}``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from khoclient import Client, KhoError, NotifierEvent

from .common import base_args, connect, report, say
from .kvdata import Dataset, parse_sizes
from .kvdb import Store
from .kvformat import KvError, Unsealed
from .kvlog import Log
from .kvmemory import AnonMemory, KhoMemory

ROLE = "kvstore"
REFUSED = 3  # exit status: a warm start refused the preserved table
ARM_AFTER_S = 0.05  # --serve: preserve again this long after open at the latest


def open_store(c: Client | None, log: str) -> tuple[Store, str, float | None]:
    """(store, how it opened: warm, cold or new, when its memory was restored)."""
    if c is None:
        return Store.replay(AnonMemory(), log), "cold", None
    mem = KhoMemory.find(c)
    if mem is not None:
        try:
            return Store.attach(mem, log), "warm", mem.restored_at
        except Unsealed as exc:
            say(ROLE, f"{exc.message}; giving that memory back and replaying {log}")
            mem.discard()
        except BaseException:
            mem.close()
            raise
    if os.path.exists(log) and os.path.getsize(log):
        mem = KhoMemory.create(c)
        try:
            return Store.replay(mem, log), "cold", None
        except BaseException:
            mem.discard()  # a log refused leaves no memory behind
            raise
    new = Log.create(log)
    mem = KhoMemory.create(c)
    try:
        return Store.create(mem, new), "new", None
    except BaseException:
        new.close()
        mem.discard()
        raise


def load(store: Store, data: Dataset) -> None:
    for key, value in data.items():
        if value is None:
            store.delete(key)
        else:
            store.put(key, value)


def verify(store: Store, data: Dataset) -> dict[str, int]:
    served = wrong = 0
    for key, want in data.expected():
        if store.get(key) == want:
            served += want is not None
        else:
            wrong += 1
    return {"keys_served": served, "keys_wrong": wrong, "keys_extra": len(store) - served}


def probe_key(data: Dataset) -> bytes:
    """The key a start's first get asks for: one the data set holds (churn never deletes it)."""
    return Dataset.key(1 if data.keys > 1 else 0)


def cold_start_ms(log: str, key: bytes) -> float:
    """This store's own cold start: replay its log into anonymous memory, answer one get."""
    t0 = time.perf_counter()
    cold = Store.replay(AnonMemory(), log, writable=False)
    cold.get(key)
    ms = (time.perf_counter() - t0) * 1e3
    cold.close()
    return ms


def subscribe(c: Client, store: Store) -> None:
    def on_finalize(ev: NotifierEvent) -> None:
        store.seal()
        st = store.stats()
        say(ROLE, f"FINALIZE: writes paused, table of {st['keys']} keys sealed")

    def on_unfreeze(ev: NotifierEvent) -> None:
        store.unseal()
        say(ROLE, "UNFREEZE: writes resumed")

    c.subscribe(on_finalize=on_finalize, on_unfreeze=on_unfreeze)


def arguments(argv: list[str] | None) -> Any:
    ap = base_args("a key-value store whose index and data survive the live update")
    ap.add_argument("--session", default="kvstore")
    ap.add_argument("--keys", type=int, default=20000, help="size of the data set (0: none)")
    ap.add_argument(
        "--value-size",
        type=parse_sizes,
        default=(400, 400),
        help="value bytes, or a range LOW-HIGH (default 400)",
    )
    ap.add_argument("--seed", type=int, default=0, help="of the data set")
    ap.add_argument(
        "--churn", action="store_true", help="overwrite every 5th key, delete every 7th"
    )
    ap.add_argument(
        "--log",
        default=os.path.join(tempfile.gettempdir(), f"khod-kvstore-{os.getuid()}.log"),
        help="the on-disk log (the cold start replays it)",
    )
    ap.add_argument("--serve", action="store_true", help="answer JSON lines on stdin")
    ap.add_argument("--cold", action="store_true", help="with --serve: no khod, replay the log")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    lo, hi = args.value_size
    data = Dataset(args.keys, lo, hi, seed=args.seed, churn=args.churn)
    if args.serve:
        return Server(args, data).run()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    key = probe_key(data)
    t0 = time.perf_counter()
    c = connect(args.socket, args.session, args.wait)
    try:
        store, mode, restored = open_store(c, args.log)
    except (KvError, KhoError) as exc:
        say(ROLE, f"refused to start: {exc}")
        c.close()
        return REFUSED if isinstance(exc, KvError) else 1
    extra: dict[str, Any] = {}
    if mode == "warm":
        store.get(key)
        warm = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        store.mem.rearm()
        extra.update(
            warm_start_ms=round(warm, 2),
            rearm_ms=round((time.perf_counter() - t1) * 1e3, 2),
            first_restore_ts=restored,
            **verify(store, data),
        )
        cold = cold_start_ms(args.log, key)
        extra.update(cold_start_ms=round(cold, 2), warm_vs_cold=round(cold / warm, 1))
        say(
            ROLE,
            f"warm start: {len(store)} keys served {warm:.1f} ms after start (hello, restore, map, "
            f"first get); {extra['keys_wrong']} wrong. Cold start from {args.log}: {cold:.1f} ms "
            f"({extra['warm_vs_cold']}x the warm start)",
        )
    elif mode == "new" and data.keys:
        load(store, data)
        st = store.stats()
        say(
            ROLE,
            f"loaded {st['keys']} keys: {st['segments']} segments of 2 MiB, {st['slots']} slots, "
            f"in {(time.perf_counter() - t0) * 1e3:.0f} ms",
        )
    else:
        say(ROLE, f"{mode} start: {len(store)} keys")
    subscribe(c, store)
    st = store.stats()
    report(
        role=ROLE,
        mode={"warm": "resume", "new": "start"}.get(mode, mode),
        session=args.session,
        keys=st["keys"],
        segments=st["segments"],
        slots=st["slots"],
        bytes_copied=0,
        **extra,
    )
    ok = extra.get("keys_wrong", 0) == 0
    if not (mode == "warm" and args.once):
        while not stop.is_set() and not c.handed_over.is_set():
            stop.wait(0.05)
    store.close()
    c.close()
    return 0 if ok else 1


class Server:
    """``--serve``: one JSON request per line on stdin, one reply per line on stdout."""

    def __init__(self, args: Any, data: Dataset) -> None:
        self.args = args
        self.data = data
        self.client: Client | None = None
        self.store: Store | None = None
        self.served = threading.Event()  # the first request after open was answered
        self.armed = threading.Event()
        self.busy = False  # answering a request
        self.stopping = False

    def send(self, msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    def run(self) -> int:
        """Serve until ``quit``, the end of stdin or SIGTERM; then stop cleanly (sealed)."""
        signal.signal(signal.SIGTERM, self.on_sigterm)
        self.send({"ready": True})
        try:
            for line in sys.stdin:
                if not line.strip():
                    continue
                self.busy = True
                op = self.answer(line)
                self.busy = False
                if op != "open":
                    self.served.set()
                if op == "quit" or self.stopping:
                    break
        finally:
            if self.store is not None:
                self.store.close()
            if self.client is not None:
                self.client.close()
        return 0

    def on_sigterm(self, *_: object) -> None:
        """Stop between requests, never inside one: a sealed table has no write half done."""
        self.stopping = True
        if not self.busy:
            sys.exit(0)

    def answer(self, line: str) -> object:
        """Reply to one request line; returns its op."""
        op: object = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise KvError("EINVAL", "a request is a JSON object")
            op = req.get("op")
            reply = {"ok": True, **self.handle(req)}
        except KvError as exc:
            reply = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
        except KhoError as exc:
            reply = {"ok": False, "error": {"code": str(exc.code), "message": exc.message}}
        except (ValueError, TypeError) as exc:
            reply = {"ok": False, "error": {"code": "EINVAL", "message": str(exc)}}
        self.send(reply)
        return op

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "open":
            return self.open()
        if op == "quit":
            return {}
        store = self.store
        if store is None:
            raise KvError("EINVAL", f"{op!r} needs an open store: send open first")
        if op == "get":
            value = store.get(_key(req))
            return {"value": None if value is None else base64.b64encode(value).decode()}
        if op == "put":
            raw = req.get("value")
            if not isinstance(raw, str):
                raise KvError("EINVAL", "put needs 'value', a base64 string")
            store.put(_key(req), base64.b64decode(raw, validate=True))
            return {}
        if op == "delete":
            return {"deleted": store.delete(_key(req))}
        if op == "load":
            load(store, self.data)
            return store.stats()
        if op == "verify":
            return verify(store, self.data)
        if op == "stats":
            return {**store.stats(), "armed": self.armed.is_set()}
        if op == "sync":
            store.sync()
            return {}
        raise KvError("EINVAL", f"unknown op {op!r}")

    def open(self) -> dict[str, Any]:
        if self.store is not None:
            raise KvError("EINVAL", "the store is already open")
        t0 = time.perf_counter()
        if not self.args.cold and self.client is None:
            self.client = connect(self.args.socket, self.args.session, self.args.wait)
        connected = time.perf_counter()
        self.store, mode, _ = open_store(self.client, self.args.log)
        if self.client is not None:
            threading.Thread(target=self.arm, args=(self.client, self.store), daemon=True).start()
        else:
            self.armed.set()
        return {
            "mode": mode,
            "keys": len(self.store),
            "open_ms": (time.perf_counter() - t0) * 1e3,
            "hello_ms": (connected - t0) * 1e3,
            **getattr(self.store.mem, "phases", {}),
        }

    def arm(self, c: Client, store: Store) -> None:
        """Preserve again and subscribe, once the first request is answered (or soon anyway).

        A warm start serves before it does this. Until it is done (at most
        ``ARM_AFTER_S`` after open, plus the calls) a finalize would not
        carry the store; khod keeps the restored folios with the session.
        """
        self.served.wait(ARM_AFTER_S)
        try:
            with store.lock:
                store.mem.rearm()
            subscribe(c, store)
            self.armed.set()
        except (KhoError, KvError) as exc:
            say(ROLE, f"cannot get ready for the next update: {exc}")


def _key(req: dict[str, Any]) -> bytes:
    key = req.get("key")
    if not isinstance(key, str):
        raise KvError("EINVAL", "a request needs 'key', a string")
    return key.encode()


if __name__ == "__main__":
    sys.exit(main())
