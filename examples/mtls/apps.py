#!/usr/bin/env python3
"""api's app for examples/mtls, behind its sidecar: HTTP on 127.0.0.1:19090 answers with the
caller's identity as the sidecar passed it (the x-forwarded-client-cert header, or "none"), and
a TCP echo on 127.0.0.1:17000. Standard library only.

    python3 examples/mtls/apps.py [--http HOST:PORT] [--tcp HOST:PORT]
"""

import argparse
import http.server
import socketserver
import threading


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


class Api(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = "api-v1\nxfcc: {}\n".format(self.headers.get("x-forwarded-client-cert", "none")).encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"api-v1 tcp: " + line)


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http", type=addr, default=("127.0.0.1", 19090))
    p.add_argument("--tcp", type=addr, default=("127.0.0.1", 17000))
    a = p.parse_args()
    http_server = http.server.ThreadingHTTPServer(a.http, Api)
    tcp_server = Threaded(a.tcp, Echo)
    threading.Thread(target=tcp_server.serve_forever, daemon=True).start()
    print("api-v1: http on {}:{}, tcp echo on {}:{}".format(*a.http, *a.tcp), flush=True)
    http_server.serve_forever()


if __name__ == "__main__":
    main()
