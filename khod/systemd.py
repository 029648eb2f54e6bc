"""systemd integration without extra dependencies: notify, watchdog, socket activation.

The protocols are small: a datagram to ``$NOTIFY_SOCKET`` for READY/STATUS/
STOPPING/WATCHDOG, and listening fds starting at 3 when ``$LISTEN_PID`` is
us (sd_listen_fds(3)).
"""

from __future__ import annotations

import os
import socket
import stat

SD_LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send ``KEY=value`` lines to the service manager; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def status(text: str) -> None:
    """Show ``text`` as the service's status line (``systemctl status``)."""
    notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between keep-alives (half of WatchdogSec), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    wpid = os.environ.get("WATCHDOG_PID")
    if not usec or (wpid and wpid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """Sockets passed by socket activation (stream Unix sockets only), in order."""
    pid, n = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if pid != str(os.getpid()) or not n:
        return []
    try:
        count = int(n)
    except ValueError:
        return []
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            out.append(sock)
        else:
            sock.detach()
    return out
