"""Shared by the end-to-end scripts: start the real `porteiro serve` on a free loopback port and
wait until it is ready, a small fake OpenAI upstream base (no Nagle delay), and the check log."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler

FAILED = []


def check(name, cond, detail=""):
    """One line per check; failures are collected for `finish()`."""
    print(("ok   " if cond else "FAIL ") + name + (f": {detail}" if detail else ""), flush=True)
    if not cond:
        FAILED.append(name)


def finish(what):
    if FAILED:
        print(f"{len(FAILED)} checks failed: {FAILED}")
        sys.exit(1)
    print(f"all {what} checks passed")


def start_porteiro(porteiro, model, config_path, env=None, timeout_s=120):
    """Starts `porteiro serve --port 0`; returns (process, base URL) once /health says ready.
    The server is killed if the calling script dies of an exception."""
    srv = subprocess.Popen([porteiro, "serve", "--port", "0", "--model", model, "--config", config_path],
                           stdout=subprocess.PIPE, stderr=sys.stderr, text=True, env=env)
    sys.excepthook = (lambda old: lambda *a: (srv.kill(), old(*a)))(sys.excepthook)
    port = int(srv.stdout.readline().strip().rsplit(":", 1)[1])
    # Keep draining stdout so the server never blocks on a full pipe.
    threading.Thread(target=lambda: srv.stdout.read(), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                return srv, base
        except Exception:
            pass
        if time.time() - t0 > timeout_s:
            srv.kill()
            sys.exit(f"porteiro did not become ready in {timeout_s} s")
        time.sleep(0.1)


class FakeUpstream(BaseHTTPRequestHandler):
    """Base for scripted OpenAI-compatible upstreams: JSON replies and SSE events."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def setup(self):
        super().setup()
        # Headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def reply_json(self, obj, status=200):
        out = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def reply_sse(self, events):
        """Sends each event as `data: …`, then [DONE], and closes the connection."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for ev in events:
            self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True
