"""HTTP/2 and gRPC test hosts and clients for tests/interop/test_h2.py, run in a namespace.

    python -m tests.interop.h2_hosts grpc-serve --port 443 --cert C --key K
    python -m tests.interop.h2_hosts grpc-call ADDR PORT --ca CA
    python -m tests.interop.h2_hosts flood ADDR PORT --ca CA --streams N
    python -m tests.interop.h2_hosts malformed ADDR PORT --ca CA

gRPC without generated code: raw bytes in and out through generic handlers (`test.Echo`:
Unary echoes, Fail aborts with NOT_FOUND, Count streams N messages back). The h2 clients use
the `h2` library over TLS with SNI example.test and ALPN h2 only. Servers print `ready`;
clients print one JSON object. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import time
from concurrent import futures
from typing import Any

import h2.events as h2e
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes

from tests.helpers import HOSTNAME

IO_TIMEOUT = 20.0
SERVICE = "test.Echo"


# --- gRPC ----------------------------------------------------------------------------------------


def grpc_serve(port: int, cert: str, key: str) -> None:
    import grpc

    def unary(request: bytes, context: Any) -> bytes:
        return b"echo:" + request

    def fail(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
        return b""

    def count(request: bytes, context: Any) -> Any:
        for i in range(int(request)):
            yield b"item %d" % i

    ident = {"request_deserializer": None, "response_serializer": None}
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **ident),
            "Fail": grpc.unary_unary_rpc_method_handler(fail, **ident),
            "Count": grpc.unary_stream_rpc_method_handler(count, **ident),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    with open(key, "rb") as k, open(cert, "rb") as c:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
    server.add_secure_port(f"0.0.0.0:{port}", creds)
    server.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    server.wait_for_termination()


def grpc_call(addr: str, port: int, ca: str) -> dict[str, Any]:
    import grpc

    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", HOSTNAME), ("grpc.default_authority", HOSTNAME)]
    out: dict[str, Any] = {}
    with grpc.secure_channel(f"{addr}:{port}", creds, options=options) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        out["unary"] = unary(b"hi", timeout=IO_TIMEOUT).decode()
        fail = channel.unary_unary(f"/{SERVICE}/Fail")
        try:
            fail(b"x", timeout=IO_TIMEOUT)
            out["fail"] = None
        except grpc.RpcError as exc:
            out["fail"] = [exc.code().value[0], exc.details()]
        count = channel.unary_stream(f"/{SERVICE}/Count")
        out["stream"] = [m.decode() for m in count(b"5", timeout=IO_TIMEOUT)]
    return out


# --- raw h2 clients ----------------------------------------------------------------------------


def _connect(addr: str, port: int, ca: str) -> tuple[ssl.SSLSocket, H2Connection]:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((addr, port), timeout=IO_TIMEOUT)
    sock = ctx.wrap_socket(raw, server_hostname=HOSTNAME)
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    conn = H2Connection(H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _request(path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "https"), (":authority", HOSTNAME), (":path", path)]


def _exchange(sock: ssl.SSLSocket, conn: H2Connection, until: Any) -> tuple[list[Any], bool]:
    """Read and answer until `until(events)` or the end; (events, whether it ended)."""
    events: list[Any] = []
    deadline = time.monotonic() + IO_TIMEOUT
    while not until(events) and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return events, True
        if not data:
            return events, True
        new = conn.receive_data(data)
        for e in new:
            if isinstance(e, h2e.DataReceived):
                conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        events += new
        if out := conn.data_to_send():
            sock.sendall(out)
    return events, False


def flood(addr: str, port: int, ca: str, streams: int, path: str) -> dict[str, Any]:
    """Open `streams` streams at once, ignoring the server's advertised limit."""
    sock, conn = _connect(addr, port, ca)
    events, _ = _exchange(
        sock, conn, lambda ev: any(isinstance(e, h2e.RemoteSettingsChanged) for e in ev)
    )
    advertised = conn.remote_settings.max_concurrent_streams
    conn.remote_settings.update({SettingCodes.MAX_CONCURRENT_STREAMS: streams + 10})
    conn.remote_settings.acknowledge()
    ids = [1 + 2 * i for i in range(streams)]
    for sid in ids:
        conn.send_headers(sid, _request(path), end_stream=True)
    sock.sendall(conn.data_to_send())

    def settled(ev: list[Any]) -> bool:
        over = {e.stream_id for e in ev if isinstance(e, h2e.StreamEnded | h2e.StreamReset)}
        return over >= set(ids)

    events, ended = _exchange(sock, conn, settled)
    sock.close()
    refused = [e.stream_id for e in events if isinstance(e, h2e.StreamReset) and e.error_code == 7]
    completed = [e.stream_id for e in events if isinstance(e, h2e.StreamEnded)]
    return {
        "advertised": advertised,
        "refused": sorted(refused),
        "completed": sorted(completed),
        "ended": ended,
    }


def malformed(addr: str, port: int, ca: str) -> dict[str, Any]:
    """One good request, then a DATA frame on stream 0: the connection must end."""
    sock, conn = _connect(addr, port, ca)
    conn.send_headers(1, _request("/hello"), end_stream=True)
    sock.sendall(conn.data_to_send())
    events, _ = _exchange(sock, conn, lambda ev: any(isinstance(e, h2e.StreamEnded) for e in ev))
    ok = any(isinstance(e, h2e.StreamEnded) for e in events)
    sock.sendall(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00" + b"oops")
    goaway = None
    ended = False
    deadline = time.monotonic() + IO_TIMEOUT
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            ended = True
            break
        if not data:
            ended = True
            break
        try:
            for e in conn.receive_data(data):
                if isinstance(e, h2e.ConnectionTerminated):
                    goaway = int(e.error_code or 0)
        except Exception:  # our own h2 may object to what follows the GOAWAY: fine
            pass
    sock.close()
    return {"first_ok": ok, "goaway": goaway, "ended": ended}


def main() -> int:
    parser = argparse.ArgumentParser(prog="h2_hosts")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("grpc-serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--cert", required=True)
    serve.add_argument("--key", required=True)
    for name in ("grpc-call", "flood", "malformed"):
        p = sub.add_parser(name)
        p.add_argument("addr")
        p.add_argument("port", type=int)
        p.add_argument("--ca", required=True)
        if name == "flood":
            p.add_argument("--streams", type=int, default=120)
            p.add_argument("--path", default="/hello")
    args = parser.parse_args()
    if args.command == "grpc-serve":
        grpc_serve(args.port, args.cert, args.key)
        return 0
    if args.command == "grpc-call":
        result = grpc_call(args.addr, args.port, args.ca)
    elif args.command == "flood":
        result = flood(args.addr, args.port, args.ca, args.streams, args.path)
    else:
        result = malformed(args.addr, args.port, args.ca)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
