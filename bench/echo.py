"""The transport floor for bench/rpc.py: a trio server that only echoes msgpack frames.

Same socket kind, same framing code (khod.protocol) and the same reply shape
as khod, and nothing else: no engine, no sessions, no checks.

    python bench/echo.py SOCKET_PATH
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


async def main(path: str) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    print("ready", flush=True)
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


if __name__ == "__main__":
    if os.path.exists(sys.argv[1]):
        os.unlink(sys.argv[1])
    trio.run(main, sys.argv[1])
