#!/usr/bin/env python3
"""A gRPC client on Python's grpcio for grpc_server.py, for the real-client
mesh tests. It dials the address it is given and knows nothing of any mesh.

Usage: grpc_client.py --target HOST:PORT CASE...

Cases: unary, stream, large, metadata, status, deadline, cancel, silent.
Each prints `PASS <case> ...` or `FAIL <case>: <why>`; the exit status is 1
when any failed.
"""

import argparse
import os
import sys
import time
import uuid

import grpc

SERVICE = "/remora.test.Echo/"
MAX_MESSAGE = 16 * 1024 * 1024


class Fail(Exception):
    pass


def check(cond, why):
    if not cond:
        raise Fail(why)


def method(channel, name, stream=False):
    make = channel.unary_stream if stream else channel.unary_unary
    return make(SERVICE + name, request_serializer=None, response_deserializer=None)


def case_unary(ch):
    reply = method(ch, "Unary")(b"hello mesh", timeout=10)
    check(reply == b"hello mesh", f"echo was {reply!r}")
    return "echoed"


def case_stream(ch):
    n = 10_000
    got = 0
    for i, msg in enumerate(method(ch, "Stream", stream=True)(b"%d" % n, timeout=60)):
        check(msg == b"msg-%d" % i, f"message {i} was {msg!r}")
        got += 1
    check(got == n, f"{got} messages, not {n}")
    return f"{got} messages in order"


def case_large(ch):
    payload = os.urandom(4 * 1024 * 1024)
    reply = method(ch, "Unary")(payload, timeout=60)
    check(len(reply) == len(payload), f"{len(reply)} bytes back, not {len(payload)}")
    check(reply == payload, "the 4 MiB echo differs")
    return f"{len(reply)} bytes echoed intact"


def case_metadata(ch):
    binary = bytes([0, 0xFF, 0x80]) + b"-bin value"
    reply, call = method(ch, "Unary").with_call(
        b"md",
        timeout=10,
        metadata=[("x-custom", "custom value"), ("x-custom-bin", binary)],
    )
    check(reply == b"md", f"echo was {reply!r}")
    initial = dict(call.initial_metadata())
    trailing = dict(call.trailing_metadata())
    check(initial.get("x-echo-custom") == "custom value", f"initial metadata {initial}")
    check(initial.get("x-echo-custom-bin") == binary, f"initial metadata {initial}")
    check(trailing.get("x-trailer") == "trailing text", f"trailing metadata {trailing}")
    want = bytes([0, 1, 2, 0xFE, 0xFF]) + b"binary"
    check(trailing.get("x-trailer-bin") == want, f"trailing metadata {trailing}")
    return "custom and -bin metadata both ways"


def case_status(ch):
    try:
        method(ch, "Fail")(b"42", timeout=10)
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, f"code {e.code()}, details {e.details()!r}")
        check(e.details() == "no such widget: 42", f"details {e.details()!r}")
        return f"{e.code()} {e.details()!r}"
    raise Fail("the call succeeded")


def was_cancelled(ch, call_id):
    answer = method(ch, "WasCancelled")(call_id.encode(), timeout=10).decode()
    check(answer.startswith("yes"), f"the server did not see call {call_id} cancelled ({answer})")
    return answer


def case_deadline(ch):
    call_id = uuid.uuid4().hex
    start = time.monotonic()
    try:
        method(ch, "Sleep")(f"{call_id}:5000".encode(), timeout=1.0)
    except grpc.RpcError as e:
        took = time.monotonic() - start
        check(
            e.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
            f"code {e.code()} details {e.details()!r} after {took:.3f}s",
        )
        check(0.9 <= took <= 2.0, f"DEADLINE_EXCEEDED after {took:.3f}s, not about 1s")
        seen = was_cancelled(ch, call_id)
        return f"DEADLINE_EXCEEDED after {took:.3f}s; server: {seen}"
    raise Fail("the call succeeded")


def case_cancel(ch):
    call_id = uuid.uuid4().hex
    future = method(ch, "Sleep").future(f"{call_id}:10000".encode(), timeout=30)
    time.sleep(0.5)
    check(future.cancel(), "the call could not be cancelled")
    check(future.cancelled(), "the future is not cancelled")
    seen = was_cancelled(ch, call_id)
    return f"cancelled after 0.5s; server: {seen}"


def case_silent(ch):
    start = time.monotonic()
    reply = method(ch, "Unary")(b"silent", timeout=30, metadata=[("x-sleep-ms", "8000")])
    took = time.monotonic() - start
    check(reply == b"silent", f"echo was {reply!r}")
    check(took >= 7.9, f"answered after {took:.3f}s: the handler did not sleep")
    return f"answered after {took:.3f}s of silence"


CASES = {
    name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    args = parser.parse_args()
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0),
    ]
    failed = 0
    with grpc.insecure_channel(args.target, options=options) as ch:
        for name in args.cases:
            start = time.monotonic()
            try:
                detail = CASES[name](ch)
                print(f"PASS {name} ({time.monotonic() - start:.2f}s): {detail}", flush=True)
            except (Fail, grpc.RpcError) as e:
                failed += 1
                if isinstance(e, grpc.RpcError):
                    e = f"{e.code()} {e.details()!r}"
                print(f"FAIL {name} ({time.monotonic() - start:.2f}s): {e}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
