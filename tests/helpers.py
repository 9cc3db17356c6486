"""Plain helpers shared by the test suites (fixtures stay in the conftest files).

- `until` / `wait_for`: wait on a condition, bounded in real time (async / blocking twins).
- `FakeClock`: protocol time that moves only when a test moves it.
- `make_pki`: a test CA, and leaves for `example.test` signed by it and by a CA nobody trusts.
- Bring-up: `loopback_tunnel` and `peer_tunnels` for two Tunnels over loopback UDP in one loop;
  `bring_up` for a gateway process, a wireguard-go peer and a ping through it (interop).

Subprocess hosts (tests.interop.tls_host) import this module too: it imports nothing of the
gateway at module level.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from tests.interop.harness import FlowsSetup, GatewayProcess, WgClient
    from unclaw_tui.engine.tunnel import Tunnel

POLL_INTERVAL = 0.01

# --- waiting on a condition --------------------------------------------------------------------


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Return once `pred()` holds; AssertionError naming `what` if it does not within `timeout`
    seconds of real time. The loop keeps running in between (short sleeps)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout}s: {what}")
        await asyncio.sleep(POLL_INTERVAL)


def wait_for(
    pred: Callable[[], bool], what: str, timeout: float = 5.0, interval: float = 0.05
) -> None:
    """`until` for blocking code (threads, subprocesses): polls `pred` every `interval` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout}s: {what}")
        time.sleep(interval)


# --- time --------------------------------------------------------------------------------------


class FakeClock:
    """A clock to pass as `clock=`: reads `now`, which only the test moves."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- a test PKI --------------------------------------------------------------------------------

HOSTNAME = "example.test"
OTHER_HOSTNAME = "auto.test"  # also in the leaves, for a second host with its own rules
TEST_CA_NAME = "unclaw test CA"  # the test CA's common name (the issuer of `trusted`)


@dataclass(frozen=True)
class Pki:
    ca_file: Path  # the test CA's certificate: what a client (or the gateway) trusts
    trusted: tuple[Path, Path]  # cert, key for HOSTNAME and OTHER_HOSTNAME, signed by the test CA
    untrusted: tuple[Path, Path]  # the same names, signed by a CA nobody trusts


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    directory: Path,
    stem: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    now: datetime.datetime,
) -> tuple[Path, Path]:
    issuer_key, issuer_cert = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(HOSTNAME))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(HOSTNAME), x509.DNSName(OTHER_HOSTNAME)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    """Write a test CA (`test-ca.pem`) and two leaves into `directory`: `trusted` (signed by the
    test CA) and `untrusted` (signed by a rogue CA whose certificate is written nowhere)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    test_ca = _ca(TEST_CA_NAME, now)
    rogue_ca = _ca("untrusted rogue CA", now)
    ca_file = directory / "test-ca.pem"
    ca_file.write_bytes(test_ca[1].public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca_file,
        _leaf(directory, "trusted", test_ca, now),
        _leaf(directory, "untrusted", rogue_ca, now),
    )


# --- bring-up ----------------------------------------------------------------------------------


def loopback_tunnel(address: str, key: bytes | None = None, **kwargs: Any) -> Tunnel:
    """A Tunnel (not started) with tunnel address `address` (e.g. "10.77.0.2/24") on an
    ephemeral loopback UDP port; `kwargs` go to Tunnel (on_event, clock, engine_thread...).
    With a fake `clock`, the event loop drives the engine (its own thread keeps real time)."""
    from unclaw_tui.engine.noise import generate_private_key
    from unclaw_tui.engine.tunnel import Tunnel

    if kwargs.get("clock") is not None:
        kwargs.setdefault("engine_thread", False)

    return Tunnel(
        key if key is not None else generate_private_key(),
        0,
        ipaddress.IPv4Interface(address),
        listen_host="127.0.0.1",
        **kwargs,
    )


def peer_tunnels(
    gw: Tunnel, cl: Tunnel, *, client_routes: str | None = None, **gw_peer: Any
) -> None:
    """Peer two started Tunnels: the gateway knows the client by its address (/32), the client
    routes `client_routes` (default: the gateway's address) to the gateway's loopback port.
    `gw_peer` goes to the gateway's add_peer (e.g. persistent_keepalive)."""
    gw.add_peer(cl.public_key, allowed_ips=[f"{cl.address.ip}/32"], **gw_peer)
    cl.add_peer(
        gw.public_key,
        allowed_ips=[client_routes or f"{gw.address.ip}/32"],
        endpoint=("127.0.0.1", gw.listen_port),
    )


def bring_up(
    s: FlowsSetup,
    *gateway_args: str,
    env: dict[str, str] | None = None,
    extra_routes: tuple[str, ...] = (),
) -> tuple[GatewayProcess, WgClient]:
    """Interop: a peer 'phone', the gateway, its wireguard-go client; the tunnel proven by a
    ping."""
    config = s.add_peer("phone")
    gw = s.start_gateway(*gateway_args, env=env)
    client = s.client(config, extra_routes=extra_routes)
    ping = client.ping("10.77.0.1", count=3, interval=0.2)
    assert ping.returncode == 0, f"no tunnel: {ping.stdout}{ping.stderr}"
    return gw, client


def decode_qr(image: Any) -> list[bytes]:
    """What the QR codes in `image` (a PIL image) say. Only QR codes are looked for: zbar's
    other symbologies can read a stray 1D barcode in a QR code's modules now and then."""
    from pyzbar.pyzbar import ZBarSymbol, decode

    return [result.data for result in decode(image, symbols=[ZBarSymbol.QRCODE])]
