"""The local certificate authority for TLS interception, and the leaf certificates it mints.

The CA is made on first use in the state dir: `ca.key` (EC P-256, PKCS#8 PEM, mode 0600) and
`ca.pem` (self-signed, 10 years, basicConstraints CA:true critical, keyUsage keyCertSign and
cRLSign). A user installs `ca.pem` on a device to let it trust intercepted connections.

Leaves are minted per hostname (or IP) on demand, all with one key pair made per process (a
fresh key per leaf would cost a key generation per host and buy nothing: the key never leaves
this process). Each leaf is valid from an hour ago (clients with a slightly slow clock) for 30
days, well within the 397 days browsers accept, never past the CA's own expiry; SAN is the name,
EKU serverAuth. The last `LEAF_CACHE_SIZE` leaves are kept (LRU).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
import ssl
import stat
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from unclaw_tui.services.base import lru_put
from unclaw_tui.state import StateError, locked, write_atomic

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=30)
BACKDATE = datetime.timedelta(hours=1)
LEAF_CACHE_SIZE = 256
SERVER_CONTEXT_CACHE_SIZE = 256
_MAX_CN = 64  # RFC 5280 ub-common-name


class CAError(StateError):
    """The CA files are missing half, unreadable or inconsistent; one line for the user (a
    StateError, so the CLI and a starting gateway report it like any state dir problem)."""


@dataclass(frozen=True, slots=True)
class Leaf:
    name: str  # the hostname or IP it is for
    cert: x509.Certificate
    cert_pem: bytes  # leaf then CA: the chain a server presents


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(**granted: bool) -> x509.KeyUsage:
    """A KeyUsage extension allowing only the `granted` uses."""
    uses = "digital_signature content_commitment key_encipherment data_encipherment key_agreement"
    uses += " key_cert_sign crl_sign encipher_only decipher_only"
    return x509.KeyUsage(**{use: granted.get(use, False) for use in uses.split()})


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _random_serial() -> int:
    # RFC 5280: positive, at most 20 octets; 64+ bits of randomness per CA/B forum practice.
    return secrets.randbits(159) | 1


def _ca_name() -> x509.Name:
    host = socket.gethostname()[:32] or "localhost"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "unclaw-tui"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"unclaw-tui local CA ({host})"),
        ]
    )


def make_ca_certificate(
    key: ec.EllipticCurvePrivateKey, now: datetime.datetime | None = None
) -> x509.Certificate:
    now = now or _now()
    name = _ca_name()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(_random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


class CertificateAuthority:
    """The CA key and certificate, and a cache of leaves minted with them."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        *,
        cert_path: Path | None = None,
        cache_size: int = LEAF_CACHE_SIZE,
    ) -> None:
        if cert.public_key() != key.public_key():
            raise CAError("the CA certificate does not belong to the CA key")
        self.key = key
        self.cert = cert
        self.cert_path = cert_path
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.cache_size = cache_size
        # One key pair for every leaf (see the module docstring).
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.leaf_key_pem = _key_pem(self.leaf_key)
        self._leaves: OrderedDict[str, Leaf] = OrderedDict()
        self._contexts: OrderedDict[tuple[str, str | None], tuple[Leaf, ssl.SSLContext]] = (
            OrderedDict()
        )
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    # -- persistence ---------------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, directory: Path) -> CertificateAuthority:
        """The CA of a state dir, made there first if it has none."""
        directory = Path(directory)
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        try:
            with locked(directory):
                if not key_path.exists() and not cert_path.exists():
                    key = ec.generate_private_key(ec.SECP256R1())
                    cert = make_ca_certificate(key)
                    write_atomic(key_path, _key_pem(key))
                    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
                    return cls(key, cert, cert_path=cert_path)
        except OSError as exc:
            raise CAError(f"cannot create the CA in {directory}: {exc.strerror or exc}") from None
        return cls.load(directory)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        directory = Path(directory)
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        for path in (key_path, cert_path):
            if not path.exists():
                raise CAError(f"{path} is missing (remove the other CA file to make a new CA)")
        try:
            mode = os.stat(key_path).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise CAError(f"{key_path} is readable by others; run: chmod 600 {key_path}")
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except OSError as exc:
            raise CAError(f"cannot read the CA in {directory}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CAError(f"the CA files in {directory} are malformed: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path} is not an EC key")
        return cls(key, cert, cert_path=cert_path)

    # -- leaves --------------------------------------------------------------------------------

    def leaf(self, name: str) -> Leaf:
        """The leaf for a hostname or an IP address (cached; least recently used goes first)."""
        name = name.lower().rstrip(".")
        leaf = self._leaves.get(name)
        now = _now()
        if leaf is None or leaf.cert.not_valid_after_utc - now <= datetime.timedelta(days=1):
            leaf = self._mint(name, now)
        lru_put(self._leaves, name, leaf, self.cache_size)
        return leaf

    def cached_names(self) -> list[str]:
        """Names with a cached leaf, least recently used first."""
        return list(self._leaves)

    def _mint(self, name: str, now: datetime.datetime) -> Leaf:
        san: x509.GeneralName
        try:
            san = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        not_after = min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:_MAX_CN])]))
            .issuer_name(self.cert.subject)
            .public_key(self.leaf_key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        return Leaf(name=name, cert=cert, cert_pem=chain)

    # -- server contexts -----------------------------------------------------------------------

    def server_context(self, name: str, alpn: str | None = None) -> ssl.SSLContext:
        """A server-side context presenting the leaf for name, offering only `alpn` (if any).

        Cached per (name, alpn) like the leaves: building one costs a file round trip, since
        `ssl` loads certificates and keys only from files."""
        leaf = self.leaf(name)
        key = (leaf.name, alpn)
        cached = self._contexts.get(key)
        if cached is not None and cached[0] is leaf:  # a renewed leaf needs a new context
            self._contexts.move_to_end(key)
            return cached[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # No session tickets: nothing to resume across leaves, and no extra post-handshake bytes.
        ctx.num_tickets = 0
        with tempfile.TemporaryDirectory(prefix="unclaw-leaf-") as tmp:
            # mkdtemp makes the directory 0700: the key is never readable by others.
            pem = Path(tmp) / "leaf.pem"
            fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(leaf.cert_pem + self.leaf_key_pem)
            ctx.load_cert_chain(pem)
        if alpn is not None:
            ctx.set_alpn_protocols([alpn])
        lru_put(self._contexts, key, (leaf, ctx), SERVER_CONTEXT_CACHE_SIZE)
        return ctx
