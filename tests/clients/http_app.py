#!/usr/bin/env python3
"""An HTTP/1.1 app on Python's http.server, for the curl tests of the
real-client mesh suite. It answers `Expect: 100-continue` itself, and counts
the request-body bytes it actually read.

  PUT|POST /refuse      401 at once, without reading the body: with
                        `Expect: 100-continue`, no 100 is ever sent
  PUT|POST /upload      reads the body (Content-Length or chunked) and answers
                        {"bytes": N, "sha256": HEX, "chunked": BOOL}
  GET|HEAD /file?size=N N bytes of 'a' (HEAD: the same headers, no body)
  GET /nocontent        204
  GET /cached           200 with ETag "v1"; 304 when If-None-Match: "v1"
  GET /files/NAME       the file NAME from --dir, with its Content-Length
  GET /trailers         a chunked body followed by the trailer fields
                        x-checksum and x-count (announced in `Trailer`)
  GET /stats            {"body_bytes": {PATH: N}, "requests": {PATH: N}}:
                        body bytes read and requests seen, per path

Usage: http_app.py --port 8080 --dir DIR
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

lock = threading.Lock()
body_bytes = {}
requests = {}
files_dir = "."


def count(table, path, n):
    with lock:
        table[path] = table.get(path, 0) + n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))
        sys.stderr.flush()

    # -- helpers

    def route(self):
        return urlsplit(self.path).path

    def reply(self, status, body=b"", headers=(), content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def refuse(self):
        """401 without reading the body; the connection cannot be reused."""
        self.close_connection = True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Bearer realm="remora-test"')
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "13")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"unauthorized\n")
        self.wfile.flush()

    def read_body(self, sink):
        """Reads the request body into sink(bytes); returns (bytes, chunked)."""
        path = self.route()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            total = 0
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    return total, True
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    if not data:
                        raise ConnectionError("the body ended early")
                    sink(data)
                    count(body_bytes, path, len(data))
                    left -= len(data)
                    total += len(data)
                self.rfile.readline(3)  # the chunk's CRLF
        left = int(self.headers.get("Content-Length", "0"))
        total = 0
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                raise ConnectionError("the body ended early")
            sink(data)
            count(body_bytes, path, len(data))
            left -= len(data)
            total += len(data)
        return total, False

    # -- Expect: 100-continue

    def handle_expect_100(self):
        count(requests, "expect:" + self.route(), 1)
        if self.route().startswith("/refuse"):
            count(requests, self.route(), 1)
            self.refuse()
            return False
        return super().handle_expect_100()  # 100 Continue, then the handler

    # -- methods

    def do_GET(self):
        path = self.route()
        count(requests, path, 1)
        query = parse_qs(urlsplit(self.path).query)
        if path == "/stats":
            with lock:
                body = json.dumps({"body_bytes": body_bytes, "requests": requests})
            self.reply(200, body.encode(), content_type="application/json")
        elif path == "/file":
            size = int(query.get("size", ["0"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"a" * size)
        elif path == "/nocontent":
            self.send_response(204)
            self.end_headers()
        elif path == "/cached":
            if self.headers.get("If-None-Match") == '"v1"':
                # A 304 may carry the representation's Content-Length; no body follows.
                self.send_response(304)
                self.send_header("ETag", '"v1"')
                self.send_header("Content-Length", "1234")
                self.end_headers()
            else:
                self.reply(200, b"c" * 1234, headers=[("ETag", '"v1"')])
        elif path.startswith("/files/"):
            name = os.path.basename(path[len("/files/"):])
            full = os.path.join(files_dir, name)
            if not os.path.isfile(full):
                self.reply(404, b"no such file\n")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(os.path.getsize(full)))
            self.end_headers()
            if self.command != "HEAD":
                with open(full, "rb") as f:
                    shutil.copyfileobj(f, self.wfile, 1 << 20)
        elif path == "/trailers":
            parts = [b"first chunk\n", b"second chunk\n", b"last chunk\n"]
            digest = hashlib.sha256(b"".join(parts)).hexdigest()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "x-checksum, x-count")
            self.end_headers()
            for part in parts:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nx-checksum: %s\r\nx-count: 3\r\n\r\n" % digest.encode())
        elif path == "/ok":
            self.reply(200, b"ok\n")
        else:
            self.reply(404, b"not found\n")

    do_HEAD = do_GET

    def do_PUT(self):
        path = self.route()
        if path.startswith("/refuse"):
            # Without Expect (with it, handle_expect_100 refused already).
            count(requests, path, 1)
            self.refuse()
            return
        count(requests, path, 1)
        if path == "/upload":
            digest = hashlib.sha256()
            n, chunked = self.read_body(digest.update)
            body = json.dumps({"bytes": n, "sha256": digest.hexdigest(), "chunked": chunked})
            self.reply(200, body.encode(), content_type="application/json")
        else:
            self.read_body(lambda _: None)
            self.reply(404, b"not found\n")

    do_POST = do_PUT


def main():
    global files_dir
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    files_dir = args.dir
    server = ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.daemon_threads = True
    print(f"http app listening on 0.0.0.0:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
