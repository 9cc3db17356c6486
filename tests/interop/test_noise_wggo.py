"""HandshakeCore against a real wireguard-go, byte for byte, without the rest of the gateway.

wireguard-go runs in one namespace; in the other, this module runs as a script that speaks the
handshake with `HandshakeCore` over a plain UDP socket and carries ICMP echo through the
resulting keys (transport messages built here, 16-byte padded as the whitepaper says).  Both
directions: we initiate and wireguard-go responds, and wireguard-go initiates (its own ping)
and we respond.  A ping that gets its answer proves both session keys.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.interop.harness import REPO_ROOT, GatewaySetup
from tests.packets import ping_packet
from unclaw_tui.engine.constants import (
    MESSAGE_INITIATION_TYPE,
    MESSAGE_RESPONSE_TYPE,
    MESSAGE_TRANSPORT_TYPE,
)
from unclaw_tui.engine.noise import (
    HandshakeCore,
    Keypair,
    aead_decrypt,
    aead_encrypt,
    b64,
    generate_private_key,
    public_key_of,
    unb64,
)

pytestmark = pytest.mark.interop

OUR_PORT = 51820
THEIR_PORT = 51821
OUR_TUNNEL_IP = "10.77.0.1"
THEIR_TUNNEL_IP = "10.77.0.2"
TRANSPORT_HEADER = struct.Struct("<IIQ")  # type, receiver index, counter


# --- the script side (runs inside the namespace) -----------------------------------------


def icmp_echo(src: str, dst: str, kind: int, ident: int, seq: int, payload: bytes) -> bytes:
    return ping_packet(src, dst, ident=ident, seq=seq, data=payload, icmp_type=kind)


def parse_icmp(packet: bytes) -> dict[str, Any]:
    total_length = struct.unpack_from("!H", packet, 2)[0]
    packet = packet[:total_length]  # drop the transport padding
    header_length = (packet[0] & 0x0F) * 4
    kind, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", packet, header_length)
    return {
        "src": socket.inet_ntoa(packet[12:16]),
        "dst": socket.inet_ntoa(packet[16:20]),
        "proto": packet[9],
        "kind": kind,
        "ident": ident,
        "seq": seq,
        "payload": packet[header_length + 8 :],
    }


class Transport:
    """Send and receive data messages with one keypair."""

    def __init__(self, sock: socket.socket, keypair: Keypair, peer: tuple[str, int]) -> None:
        self.sock, self.keypair, self.peer = sock, keypair, peer
        self.counter = 0

    def send(self, packet: bytes) -> None:
        padded = packet + bytes(-len(packet) % 16)
        header = TRANSPORT_HEADER.pack(
            MESSAGE_TRANSPORT_TYPE, self.keypair.remote_index, self.counter
        )
        self.sock.sendto(
            header + aead_encrypt(self.keypair.send_key, self.counter, padded, b""), self.peer
        )
        self.counter += 1

    def receive(self) -> bytes:
        """The next non-keepalive data packet for our index, decrypted."""
        while True:
            data, _ = self.sock.recvfrom(2048)
            if data[:4] != struct.pack("<I", MESSAGE_TRANSPORT_TYPE):
                continue
            _, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
            assert receiver == self.keypair.local_index, (receiver, self.keypair)
            plain = aead_decrypt(self.keypair.recv_key, counter, data[16:], b"")
            if plain:
                return plain


def receive_type(sock: socket.socket, kind: int) -> tuple[bytes, tuple[str, int]]:
    while True:
        data, addr = sock.recvfrom(2048)
        if data[:4] == struct.pack("<I", kind):
            return data, addr


def run_script(mode: str, private_b64: str, peer_b64: str, peer_host: str) -> dict[str, Any]:
    core = HandshakeCore(unb64(private_b64))
    peer_key = unb64(peer_b64)
    core.add_peer(peer_key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", OUR_PORT))
    sock.settimeout(10)
    print("ready", flush=True)
    result: dict[str, Any] = {}
    if mode == "initiate":
        initiation = core.create_initiation(peer_key, 0x1A2B3C4D, time.monotonic())
        sock.sendto(initiation, (peer_host, THEIR_PORT))
        response, addr = receive_type(sock, MESSAGE_RESPONSE_TYPE)
        result["response_size"] = len(response)
        result["response_mac1_ok"] = core.check_mac1(response)
        responder, keypair = core.consume_response(response, time.monotonic())
        result["responder_ok"] = responder == peer_key
        result["local_index"] = keypair.local_index
        transport = Transport(sock, keypair, addr)
        transport.send(icmp_echo(OUR_TUNNEL_IP, THEIR_TUNNEL_IP, 8, 0x77, 1, b"unclaw noise"))
        reply = parse_icmp(transport.receive())
        result["reply"] = {k: v for k, v in reply.items() if k != "payload"}
        result["reply_payload"] = reply["payload"].decode(errors="replace")
    else:
        initiation, addr = receive_type(sock, MESSAGE_INITIATION_TYPE)
        result["initiation_size"] = len(initiation)
        result["initiation_mac1_ok"] = core.check_mac1(initiation)
        consumed = core.consume_initiation(initiation, time.monotonic())
        result["initiator_ok"] = consumed.peer_public_key == peer_key
        response, keypair = core.create_response(peer_key, 0x5E6F7A8B, time.monotonic())
        sock.sendto(response, addr)
        transport = Transport(sock, keypair, addr)
        answered = []
        while len(answered) < 3:
            request = parse_icmp(transport.receive())
            if request["proto"] != socket.IPPROTO_ICMP or request["kind"] != 8:
                continue
            transport.send(
                icmp_echo(
                    request["dst"],
                    request["src"],
                    0,
                    request["ident"],
                    request["seq"],
                    request["payload"],
                )
            )
            answered.append({"src": request["src"], "dst": request["dst"]})
        result["answered"] = answered
    return result


# --- the test side -----------------------------------------------------------------------


def _client_config(their_private: bytes, our_public: bytes, gateway_addr: str) -> str:
    return (
        "[Interface]\n"
        f"PrivateKey = {b64(their_private)}\n"
        f"ListenPort = {THEIR_PORT}\n"
        "[Peer]\n"
        f"PublicKey = {b64(our_public)}\n"
        f"AllowedIPs = {OUR_TUNNEL_IP}/32\n"
        f"Endpoint = {gateway_addr}:{OUR_PORT}\n"
    )


def _start_script(s: GatewaySetup, mode: str, our_private: bytes, their_public: bytes):
    proc = s.topo.spawn(
        s.gateway_ns,
        sys.executable,
        "-m",
        "tests.interop.test_noise_wggo",
        mode,
        b64(our_private),
        b64(their_public),
        "192.168.77.2",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO_ROOT),
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_we_initiate_and_wireguard_go_responds(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    ours, theirs = generate_private_key(), generate_private_key()
    s.topo.wg_client(
        s.client_ns,
        _client_config(theirs, public_key_of(ours), s.gateway_addr),
        f"{THEIR_TUNNEL_IP}/32",
        routes=(f"{OUR_TUNNEL_IP}/32",),
    )
    # Only start after wireguard-go is configured, so the initiation is not lost.
    result = _finish(_start_script(s, "initiate", ours, public_key_of(theirs)))
    assert result["response_size"] == 92
    assert result["response_mac1_ok"] and result["responder_ok"]
    assert result["reply"] == {
        "src": THEIR_TUNNEL_IP,
        "dst": OUR_TUNNEL_IP,
        "proto": socket.IPPROTO_ICMP,
        "kind": 0,
        "ident": 0x77,
        "seq": 1,
    }
    assert result["reply_payload"] == "unclaw noise"


def test_wireguard_go_initiates_and_we_respond(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    ours, theirs = generate_private_key(), generate_private_key()
    client = s.topo.wg_client(
        s.client_ns,
        _client_config(theirs, public_key_of(ours), s.gateway_addr),
        f"{THEIR_TUNNEL_IP}/32",
        routes=(f"{OUR_TUNNEL_IP}/32",),
    )
    proc = _start_script(s, "respond", ours, public_key_of(theirs))
    ping = client.ping(OUR_TUNNEL_IP, count=3, timeout=5)
    result = _finish(proc)
    assert result["initiation_size"] == 148
    assert result["initiation_mac1_ok"] and result["initiator_ok"]
    assert result["answered"] == [{"src": THEIR_TUNNEL_IP, "dst": OUR_TUNNEL_IP}] * 3
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert client.latest_handshake() > 0


if __name__ == "__main__":
    print(json.dumps(run_script(*sys.argv[1:5])), flush=True)
