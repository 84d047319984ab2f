"""A gRPC echo server and a line-driven client for sluice's proxyless tests, on grpcio with
generic handlers (raw bytes, no protoc).

  echo.py serve NAME ADDR [--xds] [--flaky]
      Answers every method with NAME. With --flaky, /echo.Echo/Flaky fails with UNAVAILABLE.
      With --xds it is an xds=True server: it takes its listener (RBAC, and mTLS through the
      bootstrap's certificate provider) from the control plane named in $GRPC_XDS_BOOTSTRAP
      and serves only once it has it. Prints "serving".
  echo.py client TARGET
      One channel to TARGET (e.g. xds:///echo.grpcdemo.svc.cluster.local:7070, with xDS
      credentials: mTLS where the cluster asks for it) for its whole life. Reads lines "METHOD COUNT [key=value ...]" from stdin and prints, per line, a JSON
      object counting the answers by server name and the failures by status code.
"""

import json
import os
import sys
from concurrent import futures

import grpc
import grpc.experimental


def serve(name, addr, xds, flaky):
    answer = name.encode()

    def handler(method):
        def handle(request, context):
            if flaky and method == "/echo.Echo/Flaky":
                context.abort(grpc.StatusCode.UNAVAILABLE, name + " is flaky")
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return handler(details.method)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), xds=xds)
    server.add_generic_rpc_handlers((Handler(),))
    if xds:
        # TLS as the listener from the control plane says (gRFC A29), else plain text.
        server.add_secure_port(addr, grpc.xds_server_credentials(grpc.insecure_server_credentials()))
    else:
        server.add_insecure_port(addr)
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def client(target):
    if target.startswith("xds:"):
        # TLS as the cluster from the control plane says (gRFC A29), else plain text.
        fallback = grpc.experimental.insecure_channel_credentials()
        channel = grpc.secure_channel(target, grpc.xds_channel_credentials(fallback))
    else:
        # A sidecar's outbound listener routes by authority: $ECHO_AUTHORITY names the service.
        authority = os.environ.get("ECHO_AUTHORITY")
        options = [("grpc.default_authority", authority)] if authority else []
        channel = grpc.insecure_channel(target, options=options)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        method, count = parts[0], int(parts[1])
        metadata = tuple(tuple(p.split("=", 1)) for p in parts[2:])
        call = channel.unary_unary(method)
        counts = {}
        for _ in range(count):
            try:
                key = call(b"", metadata=metadata, timeout=5).decode()
            except grpc.RpcError as e:
                key = "status:" + e.code().name
            counts[key] = counts.get(key, 0) + 1
        print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], "--xds" in sys.argv, "--flaky" in sys.argv)
    else:
        client(sys.argv[2])
