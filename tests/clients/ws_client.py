#!/usr/bin/env python3
"""A WebSocket client on Python's `websockets` for ws_server.py, for the
real-client mesh tests. It dials the URL it is given and knows nothing of
any mesh.

Usage: ws_client.py --url ws://HOST:PORT/ CASE...

Cases: hello (one echo), echoes (1,000 echoes), large (one 1 MiB binary message), client-close
(closes with 4001, and the server reports it), server-close (the server closes
with 4002, and the client sees it). Each prints `PASS <case> ...` or
`FAIL <case>: <why>`; the exit status is 1 when any failed.
"""

import argparse
import asyncio
import os
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

MAX_MESSAGE = 8 * 1024 * 1024


class Fail(Exception):
    pass


def check(cond, why):
    if not cond:
        raise Fail(why)


def dial(url):
    return connect(
        url,
        max_size=MAX_MESSAGE,
        compression=None,
        open_timeout=10,
        close_timeout=10,
        proxy=None,
    )


async def case_hello(url):
    async with dial(url) as ws:
        await ws.send("hello")
        reply = await asyncio.wait_for(ws.recv(), 5)
    check(reply == "hello", f"the echo was {reply!r}")
    return "one echo"


async def case_echoes(url):
    async with dial(url) as ws:
        for i in range(1000):
            text = f"echo {i} " + "x" * (i % 97)
            await ws.send(text)
            reply = await asyncio.wait_for(ws.recv(), 10)
            check(reply == text, f"echo {i} came back as {reply[:80]!r}")
    return "1000 echoes in order"


async def case_large(url):
    payload = os.urandom(1024 * 1024)
    async with dial(url) as ws:
        await ws.send(payload)
        reply = await asyncio.wait_for(ws.recv(), 30)
    check(isinstance(reply, bytes), f"a {type(reply).__name__} came back")
    check(len(reply) == len(payload), f"{len(reply)} bytes back, not {len(payload)}")
    check(reply == payload, "the 1 MiB message came back changed")
    return f"{len(reply)} bytes echoed intact"


async def case_client_close(url):
    async with dial(url) as ws:
        await ws.send("before close")
        check(await asyncio.wait_for(ws.recv(), 10) == "before close", "no echo")
        await ws.close(4001, "client says bye")
        check(ws.close_code == 4001, f"the server answered the close with {ws.close_code}")
    # The server reports what it received, on a new connection.
    deadline = time.monotonic() + 5
    while True:
        async with dial(url) as ws:
            await ws.send("last-close?")
            answer = await asyncio.wait_for(ws.recv(), 10)
        if answer == "last-close 4001 client says bye" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    check(answer == "last-close 4001 client says bye", f"the server saw {answer!r}")
    return f"server: {answer!r}"


async def case_server_close(url):
    async with dial(url) as ws:
        await ws.send("close-me 4002")
        try:
            msg = await asyncio.wait_for(ws.recv(), 10)
            raise Fail(f"a message instead of the close: {msg!r}")
        except ConnectionClosed as e:
            # A clean close: the server's close frame came, and ours went back
            # (a code other than 1000/1001 is ConnectionClosedError even then).
            check(e.rcvd is not None, f"no close frame received: {e!r}")
            check(e.sent is not None, f"no close frame sent back: {e!r}")
            check(e.rcvd.code == 4002, f"close code {e.rcvd.code}")
            check(e.rcvd.reason == "server says bye", f"close reason {e.rcvd.reason!r}")
            return f"client saw close {e.rcvd.code} {e.rcvd.reason!r}"


CASES = {
    "hello": case_hello,
    "echoes": case_echoes,
    "large": case_large,
    "client-close": case_client_close,
    "server-close": case_server_close,
}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    args = parser.parse_args()
    failed = 0
    for name in args.cases:
        start = time.monotonic()
        try:
            detail = await asyncio.wait_for(CASES[name](args.url), 60)
            print(f"PASS {name} ({time.monotonic() - start:.2f}s): {detail}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failed += 1
            print(f"FAIL {name} ({time.monotonic() - start:.2f}s): {e!r}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    asyncio.run(main())
