#!/usr/bin/env python3
"""A gRPC server on Python's grpcio, for the real-client mesh tests.

No protoc, no generated code: the service `remora.test.Echo` is a generic
handler whose messages are raw bytes (identity serializers). Its methods:

  Unary        echoes the request; echoes the `x-custom` request header as
               initial metadata `x-echo-custom`, and sends trailing metadata
               `x-trailer` (text) and `x-trailer-bin` (binary). Metadata
               `x-sleep-ms: N` makes it sleep N ms first (a silent call).
  Stream       the request is a count N (ASCII); answers with N messages
               `msg-0` ... `msg-(N-1)`.
  Fail         aborts with NOT_FOUND and details `no such widget: <request>`.
  Sleep        the request is `<id>:<ms>`: sleeps ms milliseconds, watching
               for the call's cancellation; a cancellation is recorded under id.
  WasCancelled the request is an id; answers `yes` once the Sleep call with
               that id saw its cancellation (waiting up to 5 s), else `no`.

Usage: grpc_server.py --port 50051
"""

import argparse
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "remora.test.Echo"
MAX_MESSAGE = 16 * 1024 * 1024

cancelled = {}  # id -> seconds after the call started when it was seen
cancelled_cv = threading.Condition()


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def unary(request, context):
    md = dict(context.invocation_metadata())
    sleep_ms = int(md.get("x-sleep-ms", "0"))
    if sleep_ms:
        log(f"unary: sleeping {sleep_ms} ms")
        time.sleep(sleep_ms / 1000)
        log(f"unary: slept, active={context.is_active()}")
    initial = []
    if "x-custom" in md:
        initial.append(("x-echo-custom", md["x-custom"]))
    if "x-custom-bin" in md:
        initial.append(("x-echo-custom-bin", md["x-custom-bin"]))
    context.send_initial_metadata(initial)
    context.set_trailing_metadata(
        [
            ("x-trailer", "trailing text"),
            ("x-trailer-bin", bytes([0, 1, 2, 0xFE, 0xFF]) + b"binary"),
        ]
    )
    return request


def stream(request, context):
    n = int(request.decode())
    for i in range(n):
        yield b"msg-%d" % i


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such widget: " + request.decode())


def sleep(request, context):
    call_id, ms = request.decode().split(":")
    started = time.monotonic()

    def on_done():
        # Runs when the RPC terminates for any reason; only a cancellation
        # leaves the context inactive before the handler returned.
        if not finished.is_set():
            with cancelled_cv:
                cancelled[call_id] = time.monotonic() - started
                cancelled_cv.notify_all()
            log(f"sleep {call_id}: cancelled after {time.monotonic() - started:.3f}s")

    finished = threading.Event()
    context.add_callback(on_done)
    deadline = started + int(ms) / 1000
    while time.monotonic() < deadline:
        if not context.is_active():
            with cancelled_cv:
                cancelled.setdefault(call_id, time.monotonic() - started)
                cancelled_cv.notify_all()
            log(f"sleep {call_id}: is_active() false after {time.monotonic() - started:.3f}s")
            return b"cancelled"
        time.sleep(0.02)
    finished.set()
    return b"slept"


def was_cancelled(request, context):
    call_id = request.decode()
    with cancelled_cv:
        cancelled_cv.wait_for(lambda: call_id in cancelled, timeout=5)
        seen = cancelled.get(call_id)
    return b"no" if seen is None else b"yes %.3f" % seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", help="unused: the harness passes every app a scratch dir")
    args = parser.parse_args()
    ident = dict(request_deserializer=None, response_serializer=None)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **ident),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, **ident),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, **ident),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep, **ident),
        "WasCancelled": grpc.unary_unary_rpc_method_handler(was_cancelled, **ident),
    }
    # grpcio's own keep-alive policy stays at its defaults: a peer that pings
    # more often than every 5 minutes without data gets GOAWAY too_many_pings.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    server.add_insecure_port(f"0.0.0.0:{args.port}")
    server.start()
    log(f"grpc server listening on 0.0.0.0:{args.port}")
    server.wait_for_termination()


if __name__ == "__main__":
    main()
