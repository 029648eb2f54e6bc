"""The standby successor: waits beside the running daemon, takes the region the moment it is let go.

``khod --standby`` does before the handover everything a start can do without
the region: it reads and checks its configuration, maps the region and
imports every module the daemon may need. It binds nothing: the control
socket and the metrics port stay the predecessor's. Then it waits on the
region's lock -- the exclusive ``flock`` a daemon holds for its whole life
(``Region.lock``) and lets go of the moment it has handed over and stopped
touching the region, or dies (the kernel drops it with the process, SIGKILL
included). Blocking in ``flock`` costs nothing and wakes within microseconds;
no polling, no pipe to set up between two processes that may be different
versions.

Once it holds the lock the standby is a plain start: whatever the region
holds, it does what ``khod`` would -- populate a handover, refuse a live
region (exit 4) or a damaged handover (exit 3), format a clean one -- so a
standby never serves a region a plain start would refuse.

One standby per region: while it waits, a standby holds an open file
description lock (``F_OFD_SETLK``; on Linux independent of ``flock``) on the
region, and a second standby is refused (exit 4). SIGTERM or SIGINT while
waiting ends the standby (exit 0) with nothing touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from khod import systemd
from khod.errors import Errno, KhoError
from khod.region import Region
from khod.startup import Exit, StartupRefused

# struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int)
_FLOCK = struct.Struct("hhqqi4x")


class StandbyStopped(Exception):
    """A signal ended the standby while it waited; nothing was touched."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def claim(region: Region) -> int:
    """The one-standby-per-region lock (a descriptor to close once the region is ours).

    An exclusive OFD lock on the region's file: it belongs to this open file
    description alone, so no other descriptor khod opens or closes on the
    region can drop it, and it conflicts with nothing but another standby's.
    """
    try:
        fd = os.open(region.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KhoError(Errno.EINVAL, f"cannot open region {region.path}: {exc.strerror}") from None
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise StartupRefused(
                Errno.EBUSY,
                f"another khod --standby is already waiting for region {region.path}; "
                "stop it first (one standby per region)",
                Exit.REGION_BUSY,
            ) from None
        raise KhoError(
            Errno.EINVAL, f"cannot lock region {region.path} for a standby: {exc.strerror}"
        ) from None
    return fd


def holder(path: str) -> int | None:
    """The pid holding ``path``'s exclusive flock, from /proc/locks (None if not found)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters' lines have "->"
        fields = line.split()
        if fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and fields[5:6] == [inode]:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


def wait_until_free(path: str) -> None:
    """Block until nobody holds ``path``'s exclusive flock (the predecessor has let go).

    A shared lock is granted the moment the exclusive one is released; it is
    dropped at once, and the caller takes the exclusive lock with
    ``Region.lock``. A signal handler that raises ends the wait (EINTR).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KhoError(
            Errno.ENOENT, f"region {path} cannot be opened while standing by: {exc.strerror}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)  # also drops the shared lock


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """SIGTERM and SIGINT end the wait with :class:`StandbyStopped` (handlers restored after)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise StandbyStopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def watchdog_pings() -> Iterator[None]:
    """Keep the service manager's watchdog fed while the main thread blocks in ``flock``."""
    interval = systemd.watchdog_interval()
    if interval is None:
        yield
        return
    done = threading.Event()

    def ping() -> None:
        # signals are the waiting main thread's: its flock must see EINTR
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        while not done.wait(interval):
            systemd.notify("WATCHDOG=1")

    t = threading.Thread(target=ping, name="khod-standby-watchdog", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def take(
    region: Region, on_wait: Callable[[], None], on_overtaken: Callable[[], None]
) -> float | None:
    """Hold ``region``'s lock, waiting for its holder to let go; the seconds waited.

    None when nobody held it (the standby starts at once). ``on_wait`` runs
    once if the region is held (the standby is then standing by);
    ``on_overtaken`` whenever another daemon took the region first when it was
    let go -- a plain start racing us -- and the standby waits for that one.
    """
    try:
        region.lock()
        return None
    except KhoError as exc:
        if exc.code != Errno.EBUSY:
            raise
    t0 = time.monotonic()
    with stoppable(), watchdog_pings():
        on_wait()
        while True:
            wait_until_free(region.path)
            try:
                region.lock()
            except KhoError as exc:
                if exc.code != Errno.EBUSY:
                    raise
                on_overtaken()
                continue
            return time.monotonic() - t0
