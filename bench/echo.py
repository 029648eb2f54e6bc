"""The transport floor for bench/rpc.py: a trio server that only echoes msgpack frames.

Same socket kind, same framing code (khod.protocol) and the same reply shape
as khod, and nothing else: no engine, no sessions, no checks.

By default it serves through trio's stream API (``receive_some``,
``send_all``), as a plain trio server would. With ``--lean`` it takes the
shortcuts khod's own connections take (khod/server.py): it reads from the
trio socket itself, and writes a reply straight into the non-blocking socket,
leaving only what the socket does not take to ``send_all``. The lean floor is
what khod's transport alone would cost.

    python bench/echo.py SOCKET_PATH [--lean]
"""

from __future__ import annotations

import os
import sys

import trio

from khod.protocol import Decoder, encode


async def handle(stream: trio.SocketStream) -> None:
    decoder = Decoder()
    async with stream:
        while data := await stream.receive_some(1 << 16):
            out = b"".join(encode({"id": m.get("id"), "result": {}}) for m in decoder.feed(data))
            if out:
                await stream.send_all(out)


async def handle_lean(stream: trio.SocketStream) -> None:
    decoder = Decoder()
    sock = stream.socket
    async with stream:
        while True:
            try:
                data = await sock.recv(1 << 16)
            except (OSError, trio.ClosedResourceError):
                return
            if not data:
                return
            out = b"".join(encode({"id": m.get("id"), "result": {}}) for m in decoder.feed(data))
            if out:
                try:
                    sent = os.write(sock.fileno(), out)
                except BlockingIOError:
                    sent = 0
                if sent < len(out):
                    await stream.send_all(out[sent:])


async def main(path: str, lean: bool) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    print("ready", flush=True)
    await trio.serve_listeners(handle_lean if lean else handle, [trio.SocketListener(sock)])


if __name__ == "__main__":
    if os.path.exists(sys.argv[1]):
        os.unlink(sys.argv[1])
    trio.run(main, sys.argv[1], "--lean" in sys.argv[2:])
