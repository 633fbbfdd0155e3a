"""A JSON HTTP server on loopback for tests and benchmarks that stand in for a peer's HTTP API: a router's counters
(`/expertmesh/counters`), Ray's dashboard. One place for the stub that test_controller_service.py,
test_replacement.py and benchmarks/time_to_replica.py share.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackHTTP:
    """A ThreadingHTTPServer on 127.0.0.1 with GET/PUT `routes` (path -> callable(body or None) -> (code, JSON))."""

    def __init__(self, routes: dict):
        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body) -> None:
                route = routes.get(self.path)
                code, reply = route(body) if route else (404, {"detail": "not found"})
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._answer(None)

            def do_PUT(self) -> None:  # noqa: N802 - http.server's name
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        if self.server.socket.fileno() != -1:  # not closed yet
            self.server.shutdown()
            self.server.server_close()
