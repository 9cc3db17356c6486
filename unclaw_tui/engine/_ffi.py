"""Thin checked wrappers over the C data plane (`_wgstack.h`): validate arguments in Python,
call `lib`, turn negative return codes into `EngineError`, and return plain Python values.

Nothing here runs per packet in the gateway: `io_recv` and `io_flush` handle whole batches in C.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import nacl.bindings
from nacl import _sodium

from unclaw_tui.engine._wgstack_cffi import ffi, lib

Endpoint = tuple[str, int]  # (host, port); IPv6 host without brackets

EV_HANDSHAKE_PACKET: int = lib.WG_EV_HANDSHAKE_PACKET
EV_NEED_HANDSHAKE: int = lib.WG_EV_NEED_HANDSHAKE
EV_KEYPAIR_CONFIRMED: int = lib.WG_EV_KEYPAIR_CONFIRMED
EV_KEYPAIR_FREED: int = lib.WG_EV_KEYPAIR_FREED
EV_ENDPOINT_CHANGED: int = lib.WG_EV_ENDPOINT_CHANGED
EV_KEYS_EXPIRED: int = lib.WG_EV_KEYS_EXPIRED

NEED_NO_KEY: int = lib.WG_NEED_NO_KEY
NEED_REKEY_TIME: int = lib.WG_NEED_REKEY_TIME
NEED_REKEY_MESSAGES: int = lib.WG_NEED_REKEY_MESSAGES
NEED_NO_RESPONSE: int = lib.WG_NEED_NO_RESPONSE
NEED_RECV_OLD: int = lib.WG_NEED_RECV_OLD

EINVAL: int = lib.WG_EINVAL
ENOPEER: int = lib.WG_ENOPEER
EEXIST: int = lib.WG_EEXIST
ENOSPC: int = lib.WG_ENOSPC
EINDEX: int = lib.WG_EINDEX
EIO: int = lib.WG_EIO

DROP_REASONS: tuple[str, ...] = tuple(
    ffi.string(lib.wg_drop_reason_name(i)).decode() for i in range(lib.WG_DROP__COUNT)
)

_ERROR_NAMES = {
    EINVAL: "invalid argument",
    ENOPEER: "no such peer",
    EEXIST: "peer already exists",
    ENOSPC: "out of space",
    EINDEX: "local index already in use",
    EIO: "no socket attached",
}

_KEY_SIZE = 32
_OUTPUT_BUF_SIZE = 65536


class EngineError(Exception):
    """A WG_E* error code from the engine (or a closed engine, as WG_EINVAL)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} ({_ERROR_NAMES.get(code, 'error')}, code {code})")
        self.code = code


@dataclass(frozen=True, slots=True)
class EngineEvent:
    type: int
    peer_id: int
    arg: int
    src: Endpoint | None
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerStats:
    endpoint: Endpoint | None
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    last_rx: float | None
    last_tx: float | None
    current_created: float | None
    has_current: bool
    staged: int


def _sodium_functions() -> tuple[Any, Any, Any]:
    """libsodium's AEAD and memzero, taken from the copy PyNaCl already loaded."""
    nacl.bindings.sodium_init()  # picks the CPU-specific ChaCha20 implementation

    def pointer(name: str, ctype: str) -> Any:
        address = int(_sodium.ffi.cast("uintptr_t", _sodium.ffi.addressof(_sodium.lib, name)))
        return ffi.cast(ctype, address)

    return (
        pointer("crypto_aead_chacha20poly1305_ietf_encrypt", "wg_aead_encrypt_fn"),
        pointer("crypto_aead_chacha20poly1305_ietf_decrypt", "wg_aead_decrypt_fn"),
        pointer("sodium_memzero", "wg_memzero_fn"),
    )


_ENCRYPT, _DECRYPT, _MEMZERO = _sodium_functions()


def _check(code: int, what: str) -> int:
    if code < 0:
        raise EngineError(code, what)
    return code


def _u32(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 2**32:
        raise EngineError(EINVAL, f"{what} must be an integer in [0, 2^32)")
    return value


def _endpoint_to_c(endpoint: Endpoint, out: Any) -> None:
    try:
        host, port = endpoint
        addr = ipaddress.ip_address(host)
    except (TypeError, ValueError) as exc:
        raise EngineError(EINVAL, f"bad endpoint {endpoint!r}") from exc
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise EngineError(EINVAL, f"bad port in {endpoint!r}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # the engine reports v4-mapped sources as IPv4 too
    out.family = addr.version
    packed = addr.packed
    out.addr[0 : len(packed)] = packed
    out.port = port


def _endpoint_from_c(ep: Any) -> Endpoint | None:
    if ep.family == 4:
        return (str(ipaddress.IPv4Address(bytes(ep.addr[0:4]))), ep.port)
    if ep.family == 6:
        return (str(ipaddress.IPv6Address(bytes(ep.addr[0:16]))), ep.port)
    return None


def _time_or_none(t: float) -> float | None:
    return t if t != 0 else None


class Engine:
    """One C engine: peers, keypairs, the sans-IO core and the batch IO helper."""

    def __init__(
        self,
        tunnel_ip: str,
        prefix_len: int,
        *,
        mtu: int = 1420,
        max_peers: int = 4096,
        staged_per_peer: int = 128,
    ) -> None:
        self._engine: Any = None
        ip = ipaddress.IPv4Address(tunnel_ip)
        if not 0 <= prefix_len <= 32:
            raise EngineError(EINVAL, "prefix_len must be 0..32")
        cfg = ffi.new("wg_config *")
        cfg.tunnel_ip = int(ip)
        cfg.tunnel_prefix_len = prefix_len
        cfg.mtu = mtu
        cfg.max_peers = max_peers
        cfg.staged_per_peer = staged_per_peer
        raw = lib.wg_engine_new(cfg, _ENCRYPT, _DECRYPT, _MEMZERO)
        if raw == ffi.NULL:
            raise EngineError(EINVAL, "bad engine configuration or out of memory")
        self._engine = ffi.gc(raw, lib.wg_engine_free)
        self._out_buf = ffi.new("uint8_t[]", _OUTPUT_BUF_SIZE)
        self._out_dst = ffi.new("wg_endpoint *")
        self._event = ffi.new("wg_event *")
        self._endpoint = ffi.new("wg_endpoint *")

    def close(self) -> None:
        if self._engine is not None:
            ffi.release(self._engine)  # runs wg_engine_free now, which zeroes every key
            self._engine = None

    def __del__(self) -> None:
        self.close()

    @property
    def _e(self) -> Any:
        if self._engine is None:
            raise EngineError(EINVAL, "engine is closed")
        return self._engine

    # Peers

    def peer_add(self, peer_id: int, persistent_keepalive: int = 0) -> None:
        if not isinstance(persistent_keepalive, int) or not 0 <= persistent_keepalive < 65536:
            raise EngineError(EINVAL, "persistent_keepalive must be 0..65535 seconds")
        _check(
            lib.wg_peer_add(self._e, _u32(peer_id, "peer_id"), persistent_keepalive),
            f"peer_add({peer_id})",
        )

    def peer_remove(self, peer_id: int) -> None:
        _check(lib.wg_peer_remove(self._e, _u32(peer_id, "peer_id")), f"peer_remove({peer_id})")

    def peer_add_allowed_ip(
        self, peer_id: int, network: str | ipaddress.IPv4Network | ipaddress.IPv6Network
    ) -> None:
        try:
            net = ipaddress.ip_network(network, strict=False)
        except (TypeError, ValueError) as exc:
            raise EngineError(EINVAL, f"bad network {network!r}") from exc
        packed = net.network_address.packed
        _check(
            lib.wg_peer_add_allowed_ip(
                self._e, _u32(peer_id, "peer_id"), net.version, packed, net.prefixlen
            ),
            f"peer_add_allowed_ip({peer_id}, {net})",
        )

    def peer_set_endpoint(self, peer_id: int, endpoint: Endpoint) -> None:
        _endpoint_to_c(endpoint, self._endpoint)
        _check(
            lib.wg_peer_set_endpoint(self._e, _u32(peer_id, "peer_id"), self._endpoint),
            f"peer_set_endpoint({peer_id})",
        )

    def install_keypair(
        self,
        peer_id: int,
        local_index: int,
        remote_index: int,
        send_key: bytes,
        recv_key: bytes,
        is_initiator: bool,
        now: float,
    ) -> None:
        for name, key in (("send_key", send_key), ("recv_key", recv_key)):
            if not isinstance(key, bytes) or len(key) != _KEY_SIZE:
                raise EngineError(EINVAL, f"{name} must be {_KEY_SIZE} bytes")
        _check(
            lib.wg_peer_install_keypair(
                self._e,
                _u32(peer_id, "peer_id"),
                _u32(local_index, "local_index"),
                _u32(remote_index, "remote_index"),
                send_key,
                recv_key,
                1 if is_initiator else 0,
                float(now),
            ),
            f"install_keypair(peer {peer_id}, index {local_index})",
        )

    def peer_drop_staged(self, peer_id: int) -> None:
        _check(
            lib.wg_peer_drop_staged(self._e, _u32(peer_id, "peer_id")),
            f"peer_drop_staged({peer_id})",
        )

    def peer_stats(self, peer_id: int) -> PeerStats:
        out = ffi.new("wg_peer_stats *")
        _check(
            lib.wg_peer_get_stats(self._e, _u32(peer_id, "peer_id"), out),
            f"peer_stats({peer_id})",
        )
        return PeerStats(
            endpoint=_endpoint_from_c(out.endpoint),
            rx_bytes=out.rx_bytes,
            tx_bytes=out.tx_bytes,
            rx_packets=out.rx_packets,
            tx_packets=out.tx_packets,
            last_rx=_time_or_none(out.last_rx),
            last_tx=_time_or_none(out.last_tx),
            current_created=_time_or_none(out.current_created),
            has_current=bool(out.has_current),
            staged=out.staged,
        )

    def index_in_use(self, local_index: int) -> bool:
        return bool(lib.wg_index_in_use(self._e, _u32(local_index, "local_index")))

    # The sans-IO core

    def input(self, data: bytes, src: Endpoint, now: float) -> None:
        if not isinstance(data, bytes):
            raise EngineError(EINVAL, "data must be bytes")  # the batch path is io_recv
        _endpoint_to_c(src, self._endpoint)
        _check(lib.wg_input(self._e, data, len(data), self._endpoint, float(now)), "input")

    def send_raw(self, data: bytes, dst: Endpoint) -> None:
        if not isinstance(data, bytes) or not data:
            raise EngineError(EINVAL, "data must be non-empty bytes")
        _endpoint_to_c(dst, self._endpoint)
        _check(lib.wg_send_raw(self._e, data, len(data), self._endpoint), "send_raw")

    def send_inner(self, packet: bytes, now: float) -> None:
        if not isinstance(packet, bytes) or not packet:
            raise EngineError(EINVAL, "packet must be non-empty bytes")
        _check(lib.wg_send_inner(self._e, packet, len(packet), float(now)), "send_inner")

    def tick(self, now: float) -> None:
        lib.wg_tick(self._e, float(now))

    def next_deadline(self) -> float | None:
        return _time_or_none(lib.wg_next_deadline(self._e))

    def outputs(self) -> list[tuple[bytes, Endpoint]]:
        e, buf, dst = self._e, self._out_buf, self._out_dst
        out: list[tuple[bytes, Endpoint]] = []
        while (n := _check(lib.wg_next_output(e, buf, _OUTPUT_BUF_SIZE, dst), "outputs")) > 0:
            endpoint = _endpoint_from_c(dst)
            assert endpoint is not None  # the engine only queues datagrams with a destination
            out.append((ffi.buffer(buf, n)[:], endpoint))
        return out

    def events(self) -> list[EngineEvent]:
        e, ev = self._e, self._event
        out: list[EngineEvent] = []
        while lib.wg_next_event(e, ev):
            out.append(
                EngineEvent(
                    type=ev.type,
                    peer_id=ev.peer_id,
                    arg=ev.arg,
                    src=_endpoint_from_c(ev.src),
                    data=ffi.buffer(ev.data, ev.len)[:],
                )
            )
        return out

    def drop_counts(self) -> dict[str, int]:
        e = self._e
        return {name: lib.wg_drop_count(e, i) for i, name in enumerate(DROP_REASONS)}

    def stats(self) -> dict[str, int]:
        out = ffi.new("wg_engine_stats *")
        lib.wg_engine_get_stats(self._e, out)
        return {
            "rx_datagrams": out.rx_datagrams,
            "tx_datagrams": out.tx_datagrams,
            "rx_bytes": out.rx_bytes,
            "tx_bytes": out.tx_bytes,
            "icmp_echo_replies": out.icmp_echo_replies,
        }

    # The IO helper over a UDP socket Python owns

    def io_attach(self, fd: int, family: int) -> None:
        if family not in (4, 6):
            raise EngineError(EINVAL, "family must be 4 or 6")
        if not isinstance(fd, int) or fd < 0:
            raise EngineError(EINVAL, "fd must be a non-negative integer")
        _check(lib.wg_io_attach(self._e, fd, family), "io_attach")

    def io_recv(self, now: float, max_datagrams: int = 4096) -> int:
        if not isinstance(max_datagrams, int) or not 0 < max_datagrams < 2**31:
            raise EngineError(EINVAL, "max_datagrams must be a positive int")
        code = lib.wg_io_recv(self._e, float(now), max_datagrams)
        if code == EIO:
            raise EngineError(EIO, "io_recv")
        if code < 0:
            raise OSError(-code, f"io_recv: socket error {-code}")
        return code

    def io_flush(self) -> int:
        return _check(lib.wg_io_flush(self._e), "io_flush")
