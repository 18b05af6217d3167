"""An HTTP proxy on loopback that fails a fraction of S3 requests, before or after forwarding them."""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
          b"<Message>injected fault</Message></Error>")


class FlakyProxy:
    """Every `drop_request_every`-th request gets a 503 without reaching the server; every
    `drop_response_every`-th is forwarded and then answered 503 (the client cannot know it landed).
    0 never drops. `requests` records (method, path, Authorization header) of each: who asked for what."""

    def __init__(self, upstream: str, drop_request_every: int = 7, drop_response_every: int = 11):
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.every = (drop_request_every, drop_response_every)
        self.count = 0
        self.injected = 0
        self.requests: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                    proxy.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
                before = bool(proxy.every[0]) and n % proxy.every[0] == 0
                after = bool(proxy.every[1]) and n % proxy.every[1] == 0
                if before:
                    return self._fail()
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if after:
                    return self._fail()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # a HEAD answer keeps upstream's Content-Length
                for k, v in resp.getheaders():
                    if k.lower() in ("transfer-encoding", "connection") or (k.lower() == "content-length" and not head):
                        continue
                    self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _fail(self):
                with proxy.lock:
                    proxy.injected += 1
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_ERROR)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(_ERROR)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
