#!/usr/bin/env python3
"""A WebSocket echo server on Python's `websockets`, for the real-client mesh
tests.

Every message is echoed as it came (text or binary), except these texts:

  close-me <code>   the server closes the connection with that code
                    (reason `server says bye`)
  last-close?       answers `last-close <code> <reason>`: the close code and
                    reason the server last received from a client (`none`
                    when no client closed yet)

Usage: ws_server.py --port 8765
"""

import argparse
import asyncio
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

MAX_MESSAGE = 8 * 1024 * 1024
last_close = "none"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


async def handler(ws):
    global last_close
    server_closed = False
    try:
        async for message in ws:
            if isinstance(message, str) and message.startswith("close-me "):
                code = int(message.split()[1])
                log(f"closing with {code}")
                server_closed = True
                await ws.close(code, "server says bye")
                return
            if message == "last-close?":
                await ws.send(f"last-close {last_close}")
                continue
            await ws.send(message)
    except ConnectionClosed:
        pass
    finally:
        # The close frame the client sent, when it closed first.
        if not server_closed:
            await ws.wait_closed()
            last_close = f"{ws.close_code} {ws.close_reason}"
            log(f"client closed with {last_close}")


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", help="unused: the harness passes every app a scratch dir")
    args = parser.parse_args()
    async with serve(handler, "0.0.0.0", args.port, max_size=MAX_MESSAGE, compression=None):
        log(f"websocket server listening on 0.0.0.0:{args.port}")
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main())
