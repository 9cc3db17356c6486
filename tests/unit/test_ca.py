"""The local CA: files and modes, extensions, persistence, leaves that `ssl` accepts, the LRU."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from unclaw_tui.services.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CAError,
    CertificateAuthority,
)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def test_created_on_first_use_with_modes(state_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(state_dir)
    key_mode = stat.S_IMODE(os.stat(state_dir / CA_KEY_FILE).st_mode)
    assert key_mode == 0o600
    assert (state_dir / CA_CERT_FILE).read_bytes() == ca.cert_pem
    assert ca.cert_path == state_dir / CA_CERT_FILE
    assert not [p for p in os.listdir(state_dir) if p.endswith(".tmp")]


def test_ca_certificate_properties(state_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(state_dir)
    cert = ca.cert
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert ca.key.curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3649) < lifetime < datetime.timedelta(days=3652)
    assert cert.issuer == cert.subject


def test_reload_keeps_the_same_key_and_certificate(state_dir: Path) -> None:
    first = CertificateAuthority.load_or_create(state_dir)
    second = CertificateAuthority.load_or_create(state_dir)
    assert second.cert_pem == first.cert_pem
    assert second.key.private_numbers() == first.key.private_numbers()
    # A leaf from the reloaded CA verifies against the first one's certificate.
    cafile = state_dir / CA_CERT_FILE
    assert handshake_ok(second, "example.test", cafile)


def test_half_a_ca_or_an_open_key_is_an_error(state_dir: Path) -> None:
    CertificateAuthority.load_or_create(state_dir)
    os.chmod(state_dir / CA_KEY_FILE, 0o644)
    with pytest.raises(CAError, match="chmod 600"):
        CertificateAuthority.load_or_create(state_dir)
    (state_dir / CA_KEY_FILE).unlink()
    with pytest.raises(CAError, match="missing"):
        CertificateAuthority.load_or_create(state_dir)
    (state_dir / CA_CERT_FILE).write_text("not a certificate")
    (state_dir / CA_KEY_FILE).write_text("not a key")
    os.chmod(state_dir / CA_KEY_FILE, 0o600)
    with pytest.raises(CAError, match="malformed"):
        CertificateAuthority.load_or_create(state_dir)


def test_leaf_properties(state_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(state_dir)
    leaf = ca.leaf("Example.Test.")
    cert = leaf.cert
    assert leaf.name == "example.test"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.test"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc < now - datetime.timedelta(minutes=50)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(days=397)
    assert cert.not_valid_after_utc > now + datetime.timedelta(days=29)
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)
    # One key pair for every leaf.
    assert ca.leaf("other.test").cert.public_key() == cert.public_key()
    ip_leaf = ca.leaf("198.18.0.2").cert
    ip_san = ip_leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ip_san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.18.0.2")]


def handshake_ok(
    ca: CertificateAuthority, name: str, cafile: Path, server_hostname: str | None = None
) -> bool:
    """An in-memory handshake: a client trusting cafile against a server with ca's leaf."""
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    server_ctx = ca.server_context(name, "http/1.1")
    client_ctx.set_alpn_protocols(["http/1.1"])
    ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(ci, co, server_hostname=server_hostname or name)
    server = server_ctx.wrap_bio(si, so, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for who, obj in (("client", client), ("server", server)):
            if done[who]:
                continue
            try:
                obj.do_handshake()
                done[who] = True
            except ssl.SSLWantReadError:
                pass
        si.write(co.read())
        ci.write(so.read())
        if all(done.values()):
            return client.selected_alpn_protocol() == "http/1.1"
    return False


def test_leaf_verifies_with_ssl(state_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(state_dir)
    cafile = state_dir / CA_CERT_FILE
    assert handshake_ok(ca, "example.test", cafile)
    assert handshake_ok(ca, "198.18.0.2", cafile)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake_ok(ca, "example.test", cafile, server_hostname="other.test")
    other_dir = state_dir / "other"
    other_dir.mkdir(mode=0o700)
    other = CertificateAuthority.load_or_create(other_dir)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake_ok(other, "example.test", cafile)


def test_leaf_cache_is_lru(state_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(state_dir)
    ca.cache_size = 3
    a = ca.leaf("a.test")
    ca.leaf("b.test")
    ca.leaf("c.test")
    assert ca.leaf("a.test") is a  # a hit, and now the most recent
    ca.leaf("d.test")  # evicts b, the least recently used
    assert ca.cached_names() == ["c.test", "a.test", "d.test"]
    assert ca.leaf("a.test") is a
    assert ca.leaf("b.test") is not None and "b.test" in ca.cached_names()
    assert len(ca.cached_names()) == 3


def test_server_context_is_cached_per_name_and_alpn(state_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(state_dir)
    first = ca.server_context("example.test", "h2")
    assert ca.server_context("example.test", "h2") is first
    assert ca.server_context("example.test", "http/1.1") is not first
    assert ca.server_context("example.test", None) is not first


def test_cli_ca_prints_the_pem_and_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unclaw_tui import cli

    state = tmp_path / "fresh"
    assert cli.main(["--state-dir", str(state), "ca", "--path"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(state / CA_CERT_FILE)
    assert stat.S_IMODE(os.stat(state / CA_KEY_FILE).st_mode) == 0o600
    assert cli.main(["--state-dir", str(state), "ca"]) == 0
    captured = capsys.readouterr()
    assert captured.out == (state / CA_CERT_FILE).read_text()
    assert captured.out.startswith("-----BEGIN CERTIFICATE-----")
    assert str(state / CA_CERT_FILE) in captured.err
    # Same CA every time.
    assert cli.main(["--state-dir", str(state), "ca"]) == 0
    assert capsys.readouterr().out == captured.out


def test_cli_ca_reports_a_broken_ca_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unclaw_tui import cli

    state = tmp_path / "s"
    assert cli.main(["--state-dir", str(state), "ca", "--path"]) == 0
    (state / CA_KEY_FILE).unlink()
    assert cli.main(["--state-dir", str(state), "ca"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unclaw-tui: error:") and "missing" in err and err.count("\n") == 1
