"""A misbehaving test host and its client, for tests/interop/test_faults.py (subprocesses in a
namespace; every loop bounded in count or time).

    python -m tests.interop.faulty reset-server --port 9100 --after 200000
        Accepts, sends `after` bytes, waits for the client's byte saying it got data, then
        closes with an RST (SO_LINGER 0).  Prints `ready`.
    python -m tests.interop.faulty read-until-reset HOST PORT --count 20
        `count` connections one after another, each read to its end (one byte sent back on the
        first data); JSON: how each ended.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time
from typing import Any

IO_TIMEOUT = 20.0
GOT_DATA = b"!"


def reset_server(port: int, after: int, max_seconds: float) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)
    srv.settimeout(1.0)
    print("ready", flush=True)
    t0 = time.monotonic()
    chunk = bytes(range(256)) * 256
    while time.monotonic() - t0 < max_seconds:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        conn.settimeout(IO_TIMEOUT)
        try:
            left = after
            while left > 0:
                left -= conn.send(chunk[: min(left, len(chunk))])
            # The RST comes once the client said it has data (mid-transfer, not at connect).
            conn.recv(1)
        except OSError:
            pass
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def read_until_reset(host: str, port: int, count: int) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    received: list[int] = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        got = 0
        try:
            while data := sock.recv(65536):
                if not got:
                    sock.sendall(GOT_DATA)  # the server resets once it reads this
                got += len(data)
            outcome = "eof"
        except ConnectionResetError:
            outcome = "reset"
        except TimeoutError:
            outcome = "timeout"
        finally:
            sock.close()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        received.append(got)
    return {"outcomes": outcomes, "received": received}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faulty")
    kinds = parser.add_subparsers(dest="kind", required=True)
    srv = kinds.add_parser("reset-server")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--after", type=int, default=200_000)
    srv.add_argument("--max-seconds", type=float, default=300.0)
    cli = kinds.add_parser("read-until-reset")
    cli.add_argument("host")
    cli.add_argument("port", type=int)
    cli.add_argument("--count", type=int, default=20)
    args = parser.parse_args(argv)
    if args.kind == "reset-server":
        reset_server(args.port, args.after, min(args.max_seconds, 900.0))
        return 0
    print(json.dumps(read_until_reset(args.host, args.port, min(args.count, 1000))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
