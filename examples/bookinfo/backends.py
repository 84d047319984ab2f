#!/usr/bin/env python3
"""Bookinfo-like backends on one machine: each answers every request with its name
("reviews-v2", ...). productpage's app sits behind its sidecar on 127.0.0.1:19080.
Run: python3 examples/bookinfo/backends.py   (Ctrl-C to stop)"""
import http.server
import socketserver
import threading

APPS = {
    "productpage-app": ("127.0.0.1", 19080),
    "details-v1": ("127.0.1.20", 9080),
    "ratings-v1": ("127.0.1.30", 9080),
    "reviews-v1": ("127.0.1.40", 9080),
    "reviews-v2": ("127.0.1.41", 9080),
    "reviews-v3": ("127.0.1.42", 9080),
}


def handler(name):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (name + "\n").encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


socketserver.ThreadingTCPServer.allow_reuse_address = True
for name, addr in APPS.items():
    server = socketserver.ThreadingTCPServer(addr, handler(name))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"{name} on {addr[0]}:{addr[1]}")
threading.Event().wait()
