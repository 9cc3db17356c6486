"""Thin checked wrappers over the C data plane (`_wgstack.h`, `_tcp.h`, `_splice.h`): validate
arguments in Python, call `lib`, turn negative return codes into exceptions, and return plain
Python values.  Batches (`io_recv`, `io_flush`, `tcp_events`, `udp_datagrams`) are one C call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import nacl.bindings
from nacl import _sodium

from unclaw_tui.engine._wgstack_cffi import ffi, lib
from unclaw_tui.engine.outcomes import CloseReason, SpliceOutcome

Endpoint = tuple[str, int]  # (host, port); IPv6 host without brackets
# Our side of an endpoint: (the local address a datagram arrived on, its interface index), to
# send the answers from; None: the kernel picks (see wg_endpoint in _wgstack.h).
Local = tuple[str, int]

EV_HANDSHAKE_PACKET: int = lib.WG_EV_HANDSHAKE_PACKET
EV_NEED_HANDSHAKE: int = lib.WG_EV_NEED_HANDSHAKE
EV_KEYPAIR_CONFIRMED: int = lib.WG_EV_KEYPAIR_CONFIRMED
EV_KEYPAIR_FREED: int = lib.WG_EV_KEYPAIR_FREED
EV_ENDPOINT_CHANGED: int = lib.WG_EV_ENDPOINT_CHANGED
EV_KEYS_EXPIRED: int = lib.WG_EV_KEYS_EXPIRED

NEED_NO_KEY: int = lib.WG_NEED_NO_KEY
NEED_REKEY_TIME: int = lib.WG_NEED_REKEY_TIME
NEED_NO_RESPONSE: int = lib.WG_NEED_NO_RESPONSE
NEED_RECV_OLD: int = lib.WG_NEED_RECV_OLD

EINVAL: int = lib.WG_EINVAL
ENOPEER: int = lib.WG_ENOPEER
EEXIST: int = lib.WG_EEXIST
EINDEX: int = lib.WG_EINDEX
EIO: int = lib.WG_EIO
EMSGSIZE: int = lib.WG_EMSGSIZE

TCP_EV_SYN: int = lib.TCP_EV_SYN
TCP_EV_READABLE: int = lib.TCP_EV_READABLE
TCP_EV_WRITABLE: int = lib.TCP_EV_WRITABLE
TCP_EV_PEER_FIN: int = lib.TCP_EV_PEER_FIN
TCP_EV_CLOSED: int = lib.TCP_EV_CLOSED

# The close and splice codes come from the one table in outcomes.py; the headers must agree.
_MISMATCHED = [r.name for r in CloseReason if getattr(lib, f"TCP_CLOSE_{r.name}") != r] + [
    o.name for o in SpliceOutcome if getattr(lib, f"SPLICE_{o.name}") != o
]
if _MISMATCHED:
    raise ImportError(f"engine build disagrees with outcomes.py on {_MISMATCHED}")
TCP_CLOSE_NORMAL: int = CloseReason.NORMAL
TCP_CLOSE_RESET: int = CloseReason.RESET
TCP_CLOSE_TIMEOUT: int = CloseReason.TIMEOUT
TCP_CLOSE_REJECTED: int = CloseReason.REJECTED
TCP_CLOSE_PEER_REMOVED: int = CloseReason.PEER_REMOVED
TCP_CLOSE_NAMES: dict[int, str] = {r: r.label for r in CloseReason}

TCP_ST_SYN_PENDING: int = lib.TCP_ST_SYN_PENDING
TCP_ST_ESTABLISHED: int = lib.TCP_ST_ESTABLISHED
TCP_ST_CLOSE_WAIT: int = lib.TCP_ST_CLOSE_WAIT

TCP_EINVAL: int = lib.TCP_EINVAL
TCP_ENOCONN: int = lib.TCP_ENOCONN
TCP_ESTATE: int = lib.TCP_ESTATE
TCP_ERESET: int = lib.TCP_ERESET
TCP_EAGAIN: int = lib.TCP_EAGAIN

SPLICE_OK: int = SpliceOutcome.OK
SPLICE_FAIL_CONNECT: int = SpliceOutcome.FAIL_CONNECT
SPLICE_FAIL_PEER: int = SpliceOutcome.FAIL_PEER
SPLICE_FAIL_HOST: int = SpliceOutcome.FAIL_HOST
SPLICE_FAIL_PEER_GONE: int = SpliceOutcome.FAIL_PEER_GONE
SPLICE_FAIL_ABORTED: int = SpliceOutcome.FAIL_ABORTED

ICMP_HOST_UNREACHABLE = 1
ICMP_PORT_UNREACHABLE = 3
ICMP_ADMIN_PROHIBITED = 13


def _names(name_of: Callable[[int], Any], count: int) -> tuple[str, ...]:
    return tuple(ffi.string(name_of(i)).decode() for i in range(count))


DROP_REASONS = _names(lib.wg_drop_reason_name, lib.WG_DROP__COUNT)

_ERROR_NAMES = {
    EINVAL: "invalid argument",
    ENOPEER: "no such peer",
    EEXIST: "peer already exists",
    lib.WG_ENOSPC: "out of space",
    EINDEX: "local index already in use",
    EIO: "no socket attached",
    EMSGSIZE: "larger than the tunnel MTU",
    lib.WG_ENOMEM: "out of memory",
}

_TCP_ERROR_NAMES = {
    TCP_EINVAL: "invalid argument",
    TCP_ENOCONN: "no such connection",
    TCP_ESTATE: "not possible in this state",
    lib.TCP_ENOMEM: "out of memory",
    TCP_ERESET: "connection reset",
    TCP_EAGAIN: "nothing to read",
}

_KEY_SIZE = 32
_TCP_DROP_REASONS = _names(lib.tcp_drop_reason_name, lib.TCP_DROP__COUNT)
_DROP_NAMES = (*DROP_REASONS, *(f"tcp_{name}" for name in _TCP_DROP_REASONS))
_OUTPUT_BUF_SIZE = 65536
_TCP_EVENT_BATCH = 4096
_SPLICE_RESULT_BATCH = 1024


class EngineError(Exception):
    """A WG_E* error code from the engine (or a closed engine, as WG_EINVAL)."""

    def __init__(self, code: int, message: str, names: dict[int, str] | None = None) -> None:
        name = (_ERROR_NAMES if names is None else names).get(code, "error")
        super().__init__(f"{message} ({name}, code {code})")
        self.code = code


@dataclass(frozen=True, slots=True)
class EngineEvent:
    type: int
    peer_id: int
    arg: int
    src: Endpoint | None
    data: bytes
    local: Local | None = None  # where src's datagram arrived; answers leave from there


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
    udp_share_drops: int = 0  # UDP datagrams refused: the peer held its share of the queue
    local: Local | None = None  # our address the peer last wrote to


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """A TCP connection a peer opened: src is the peer's side, dst where it wanted to go."""

    conn_id: int
    peer_id: int
    src: Endpoint
    dst: Endpoint
    state: int  # TCP_ST_*
    bytes_in: int  # payload bytes received in order from the peer
    bytes_out: int  # payload bytes the peer acknowledged
    close_reason: int  # TCP_CLOSE_* once closed, else 0


@dataclass(frozen=True, slots=True)
class SpliceResult:
    """How a spliced (relayed in C) connection ended; see _splice.h."""

    conn_id: int
    outcome: int  # SPLICE_OK or SPLICE_FAIL_*
    error: int  # errno, for SPLICE_FAIL_CONNECT / SPLICE_FAIL_HOST
    tcp_close: int  # TCP_CLOSE_*, for SPLICE_FAIL_PEER / SPLICE_FAIL_PEER_GONE
    bytes_up: int  # peer -> destination
    bytes_down: int  # destination -> peer
    ended_at: float  # when it ended (the engine's clock)


@dataclass(frozen=True, slots=True)
class FastOpen:
    """A connection the engine spliced on its own (a fast-relay destination); see _wgstack.h."""

    conn_id: int
    peer_id: int
    src: Endpoint  # the peer's side
    dst: Endpoint
    opened_at: float  # when its SYN was taken (the engine's clock)


@dataclass(frozen=True, slots=True)
class UdpMeta:
    """A UDP datagram from a peer: src is the peer's side, dst where it was sent."""

    peer_id: int
    src: Endpoint
    dst: Endpoint
    data: bytes


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


def _peer_stats(out: Any) -> PeerStats:
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
        udp_share_drops=out.udp_share_drops,
        local=_local_from_c(out.endpoint),
    )


def _check(code: int, what: str) -> int:
    if code < 0:
        raise EngineError(code, what)
    return code


def _tcp_check(code: int, what: str) -> int:
    if code == TCP_ERESET:
        raise ConnectionResetError(f"{what}: connection reset")
    if code < 0:
        raise EngineError(code, what, _TCP_ERROR_NAMES)
    return code


def _u32(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 2**32:
        raise EngineError(EINVAL, f"{what} must be an integer in [0, 2^32)")
    return value


def _parse_endpoint(
    endpoint: Endpoint, what: str
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    try:
        host, port = endpoint
        addr = ipaddress.ip_address(host)
    except (TypeError, ValueError) as exc:
        raise EngineError(EINVAL, f"bad {what} {endpoint!r}") from exc
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise EngineError(EINVAL, f"bad port in {what} {endpoint!r}")
    return addr, port


def _endpoint_to_c(endpoint: Endpoint, out: Any, local: Local | None = None) -> Any:
    """Fill the `wg_endpoint *` out (with our side, local, when known), and return it."""
    addr, port = _parse_endpoint(endpoint, "endpoint")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # the engine reports v4-mapped sources as IPv4 too
    out.family = addr.version
    packed = addr.packed
    out.addr[0 : len(packed)] = packed
    out.port = port
    out.local[0:16] = bytes(16)
    out.ifindex = 0
    if local is not None:
        try:
            laddr = ipaddress.ip_address(local[0])
            ifindex = _u32(local[1], "ifindex")
        except (TypeError, ValueError, IndexError) as exc:
            raise EngineError(EINVAL, f"bad local address {local!r}") from exc
        if isinstance(laddr, ipaddress.IPv6Address) and laddr.ipv4_mapped is not None:
            laddr = laddr.ipv4_mapped
        if laddr.version != addr.version:
            raise EngineError(EINVAL, f"local address {local!r} is not of {endpoint!r}'s family")
        out.local[0 : len(laddr.packed)] = laddr.packed
        out.ifindex = ifindex
    return out


def _local_from_c(ep: Any) -> Local | None:
    size = {4: 4, 6: 16}.get(ep.family)
    if size is None:
        return None
    packed = bytes(ep.local[0:size])
    if not any(packed):
        return None
    return str(ipaddress.ip_address(packed)), int(ep.ifindex)


def _endpoint_from_c(ep: Any) -> Endpoint | None:
    size = {4: 4, 6: 16}.get(ep.family)  # address bytes; other families: no endpoint
    return None if size is None else (str(ipaddress.ip_address(bytes(ep.addr[0:size]))), ep.port)


def _time_or_none(t: float) -> float | None:
    return t if t != 0 else None


def _ipv4_str(addr: int) -> str:
    return socket.inet_ntoa(addr.to_bytes(4, "big"))


def _flow(c: Any) -> tuple[Endpoint, Endpoint]:
    """(src, dst) of a C struct's src_ip, src_port, dst_ip, dst_port (IPv4), or of its
    src_addr / dst_addr when it has a family and that is 6."""
    if getattr(c, "family", 4) == 6:
        src = str(ipaddress.IPv6Address(bytes(c.src_addr[0:16])))
        dst = str(ipaddress.IPv6Address(bytes(c.dst_addr[0:16])))
        return (src, c.src_port), (dst, c.dst_port)
    return (_ipv4_str(c.src_ip), c.src_port), (_ipv4_str(c.dst_ip), c.dst_port)


def _addr_pair(a: Endpoint, b: Endpoint) -> tuple[int, bytes, int, bytes, int]:
    """(family, a's packed address, a's port, b's, b's) of two endpoints of one family."""
    a_addr, a_port = _parse_endpoint(a, "endpoint")
    b_addr, b_port = _parse_endpoint(b, "endpoint")
    if a_addr.version != b_addr.version:
        raise EngineError(EINVAL, f"{a!r} and {b!r} are not of one family")
    return a_addr.version, a_addr.packed, a_port, b_addr.packed, b_port


def _ipv4_endpoint_to_c(endpoint: Endpoint, what: str) -> tuple[int, int]:
    """(address as a host-order int, port) of an IPv4 endpoint."""
    addr, port = _parse_endpoint(endpoint, what)
    if addr.version != 4:
        raise EngineError(EINVAL, f"bad IPv4 {what} {endpoint!r}")
    return int(addr), port


def _fields(out: Any) -> dict[str, int]:
    """A C struct of counters (through a pointer) as {field: value}."""
    return {name: getattr(out, name) for name, _ in ffi.typeof(out).item.fields}


T = TypeVar("T")


def _pop_all(pop: Callable[[Any, int], int], buf: Any, convert: Callable[[Any], T]) -> list[T]:
    """Everything a C queue holds: `pop(buf, len(buf))` fills buf and returns the count, until
    it returns less than a full batch."""
    out: list[T] = []
    while True:
        n = pop(buf, len(buf))
        out.extend(convert(buf[i]) for i in range(n))
        if n < len(buf):
            return out


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
        tcp_rcvbuf: int = 0,
        tcp_sndbuf: int = 0,
        tcp_max_conns: int = 0,
        tcp_max_conns_per_peer: int = 0,
        tcp_max_half_open_per_peer: int = 0,
        tunnel_ip6: str | None = None,
    ) -> None:
        """TCP settings 0 take the engine's defaults (256 KiB buffers each way, 65536
        connections, 4096 per peer, 256 half-open per peer).  tunnel_ip6: the gateway's IPv6
        tunnel address (ICMPv6 echo to it is answered), None for none."""
        self._engine: Any = None
        self._worker: Any = None
        self._lock_owner: int | None = None
        ip = int(ipaddress.IPv4Address(tunnel_ip))
        if not 0 <= prefix_len <= 32:
            raise EngineError(EINVAL, "prefix_len must be 0..32")
        cfg = ffi.new("wg_config *")
        cfg.tunnel_ip = ip
        cfg.tunnel_prefix_len = prefix_len
        if tunnel_ip6 is not None:
            try:
                cfg.tunnel_ip6 = list(ipaddress.IPv6Address(tunnel_ip6).packed)
            except ValueError as exc:
                raise EngineError(EINVAL, f"bad tunnel_ip6 {tunnel_ip6!r}") from exc
        cfg.mtu = mtu
        cfg.max_peers = max_peers
        cfg.staged_per_peer = staged_per_peer
        tcp_settings = {
            "tcp_rcvbuf": tcp_rcvbuf,
            "tcp_sndbuf": tcp_sndbuf,
            "tcp_max_conns": tcp_max_conns,
            "tcp_max_conns_per_peer": tcp_max_conns_per_peer,
            "tcp_max_half_open_per_peer": tcp_max_half_open_per_peer,
        }
        for name, value in tcp_settings.items():
            setattr(cfg, name, _u32(value, name))
        cfg.tcp_iss_seed = int.from_bytes(os.urandom(8), "little")
        raw = lib.wg_engine_new(cfg, _ENCRYPT, _DECRYPT, _MEMZERO)
        if raw == ffi.NULL:
            raise EngineError(EINVAL, "bad engine configuration or out of memory")
        self._engine = ffi.gc(raw, lib.wg_engine_free)
        self._tcp = lib.wg_engine_tcp(raw)  # lives as long as the engine
        self._splice = lib.wg_engine_splice(raw)  # NULL without epoll: nothing is spliced
        self._splice_results = ffi.new("splice_result[]", _SPLICE_RESULT_BATCH)
        self._fast_opened = ffi.new("wg_fast_open[]", _SPLICE_RESULT_BATCH)
        self._tcp_events = ffi.new("tcp_event[]", _TCP_EVENT_BATCH)
        self._tcp_info = ffi.new("tcp_conn_info *")
        # tcp_read copies into this, then one copy into bytes: as large as a receive buffer
        self._read_cap = tcp_rcvbuf or 256 * 1024
        self._read_buf = ffi.new("uint8_t[]", self._read_cap)
        self._udp_meta = ffi.new("wg_udp_meta[]", lib.WG_UDP_QUEUE_MAX)
        self._udp_arena = ffi.new("uint8_t **")
        self._out_buf = ffi.new("uint8_t[]", _OUTPUT_BUF_SIZE)
        self._out_dst = ffi.new("wg_endpoint *")
        self._event = ffi.new("wg_event *")
        self._pending = ffi.new("wg_pending *")
        self._drops = ffi.new("uint64_t[]", len(_DROP_NAMES))
        self._endpoint = ffi.new("wg_endpoint *")

    def close(self) -> None:
        self.worker_stop()
        if self._engine is not None:
            self._splice = ffi.NULL  # freed with the engine: later calls find no splice
            ffi.release(self._engine)  # runs wg_engine_free now, which zeroes every key
            self._engine = None

    def __del__(self) -> None:
        self.close()

    # The data plane's thread (_worker.h).  While it runs, every public method takes the engine
    # lock for its call (`_serialized` below), unless this thread holds it already (`locked()`
    # around a sequence).

    def worker_start(self, notify_fd: int) -> None:
        """Run the data plane on its own C thread; `notify_fd` (an eventfd) becomes readable
        when the engine has work for us: answer with `locked()` + collect and drain."""
        if self._worker is not None:
            raise EngineError(EINVAL, "the worker is already running")
        worker = lib.wg_worker_start(self._e, notify_fd)
        if worker == ffi.NULL:
            err = ffi.errno or EINVAL
            raise OSError(err, f"cannot start the engine thread: {os.strerror(err)}")
        self._worker = worker

    def worker_stop(self) -> None:
        if self._worker is not None and self._lock_owner == threading.get_ident():
            # Joining needs the lock this thread holds: a deadlock, not a stop.
            raise RuntimeError("worker_stop inside Engine.locked()")
        worker, self._worker = self._worker, None
        if worker is not None:
            lib.wg_worker_stop(worker)  # joins the thread; the engine is ours alone again

    @property
    def threaded(self) -> bool:
        return self._worker is not None

    def worker_stats(self) -> dict[str, int]:
        if self._worker is None:
            return {"wakeups": 0, "notifications": 0}
        out = ffi.new("wg_worker_stats *")
        lib.wg_worker_get_stats(self._worker, out)
        return _fields(out)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the engine for a sequence of calls (re-entrant on this thread)."""
        taken = self._take_lock()
        try:
            yield
        finally:
            self._give_lock(taken)

    def _take_lock(self) -> Any:
        """Take the engine lock unless no worker runs or this thread holds it already; returns
        the worker to give it back to (None: nothing was taken)."""
        worker = self._worker
        if worker is None or self._lock_owner == threading.get_ident():
            return None
        lib.wg_worker_lock(worker)  # waits without the interpreter lock
        self._lock_owner = threading.get_ident()
        return worker

    def _give_lock(self, worker: Any) -> None:
        if worker is not None:
            self._lock_owner = None
            lib.wg_worker_unlock(worker)

    # The checked calls: each raises on a negative return code, else returns it.

    @property
    def _e(self) -> Any:
        if self._engine is None:
            raise EngineError(EINVAL, "engine is closed")
        return self._engine

    @property
    def _t(self) -> Any:
        if self._engine is None:
            raise EngineError(EINVAL, "engine is closed")
        return self._tcp

    def _call(self, fn: Callable[..., int], *args: Any) -> int:
        """`fn(engine, *args)`; EngineError (WG_E*) on failure."""
        return _check(fn(self._e, *args), fn.__name__)

    def _peer_call(self, fn: Callable[..., int], peer_id: int, *args: Any) -> int:
        """`fn(engine, peer_id, *args)`; EngineError (WG_E*) naming the peer on failure."""
        code = fn(self._e, _u32(peer_id, "peer_id"), *args)
        if code < 0:
            raise EngineError(code, f"{fn.__name__}(peer {peer_id})")
        return code

    def _conn_call(self, fn: Callable[..., int], conn_id: int, *args: Any) -> int:
        """`fn(tcp stack, conn_id, *args)`; ConnectionResetError when the connection was reset,
        EngineError (TCP_E*) on other failures."""
        return _tcp_check(fn(self._t, _u32(conn_id, "conn_id"), *args), fn.__name__)

    def _splice_call(self, fn: Callable[..., int], conn_id: int, *args: Any) -> None:
        """`fn(splice table, conn_id, *args)`; EngineError (TCP_E*) when the connection cannot
        be spliced, OSError (-errno) when no socket could be started."""
        if self._splice == ffi.NULL:
            raise EngineError(TCP_ENOCONN, f"{fn.__name__}: no splices (closed)", _TCP_ERROR_NAMES)
        code = fn(self._splice, _u32(conn_id, "conn_id"), *args)
        if code in (TCP_ENOCONN, TCP_ESTATE, TCP_EINVAL):
            raise EngineError(code, fn.__name__, _TCP_ERROR_NAMES)
        if code < 0:
            raise OSError(-code, os.strerror(-code))

    # Peers

    def peer_add(self, peer_id: int, persistent_keepalive: int = 0) -> None:
        if not isinstance(persistent_keepalive, int) or not 0 <= persistent_keepalive < 65536:
            raise EngineError(EINVAL, "persistent_keepalive must be 0..65535 seconds")
        self._peer_call(lib.wg_peer_add, peer_id, persistent_keepalive)

    def peer_remove(self, peer_id: int) -> None:
        """Also closes the peer's TCP connections without sending anything: each handle still
        held gets TCP_EV_CLOSED with TCP_CLOSE_PEER_REMOVED and must still be released."""
        self._peer_call(lib.wg_peer_remove, peer_id)

    def peer_add_allowed_ip(
        self, peer_id: int, network: str | ipaddress.IPv4Network | ipaddress.IPv6Network
    ) -> None:
        try:
            net = ipaddress.ip_network(network, strict=False)
        except (TypeError, ValueError) as exc:
            raise EngineError(EINVAL, f"bad network {network!r}") from exc
        packed = net.network_address.packed
        self._peer_call(lib.wg_peer_add_allowed_ip, peer_id, net.version, packed, net.prefixlen)

    def peer_set_endpoint(
        self, peer_id: int, endpoint: Endpoint, local: Local | None = None
    ) -> None:
        """Without local, an unchanged endpoint keeps the local side its packets taught C."""
        ep = _endpoint_to_c(endpoint, self._endpoint, local)
        self._peer_call(lib.wg_peer_set_endpoint, peer_id, ep)

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
        local, remote = _u32(local_index, "local_index"), _u32(remote_index, "remote_index")
        initiator = 1 if is_initiator else 0
        self._peer_call(
            lib.wg_peer_install_keypair, peer_id, local, remote, send_key, recv_key, initiator, now
        )

    def peer_abort_flows(self, peer_id: int, reason: CloseReason, now: float) -> int:
        """End the peer's TCP connections and splices (PEER_GONE: all, silently; PRESSURE: those
        its zero window holds open, an RST each), reported as usual; returns how many."""
        return _check(
            lib.wg_peer_abort_flows(self._e, _u32(peer_id, "peer_id"), int(reason), float(now)),
            "peer_abort_flows",
        )

    def peer_drop_staged(self, peer_id: int) -> None:
        self._peer_call(lib.wg_peer_drop_staged, peer_id)

    def peer_stats(self, peer_id: int) -> PeerStats:
        out = ffi.new("wg_peer_stats *")
        self._peer_call(lib.wg_peer_get_stats, peer_id, out)
        return _peer_stats(out)

    def peers_stats(self, peer_ids: list[int]) -> list[PeerStats]:
        """peer_stats of many peers in one C call (an unknown id gives zeroed stats)."""
        if not peer_ids:
            return []
        ids = ffi.new("uint32_t[]", [_u32(i, "peer_id") for i in peer_ids])
        out = ffi.new("wg_peer_stats[]", len(peer_ids))
        self._call(lib.wg_peers_get_stats, ids, len(peer_ids), out)
        return [_peer_stats(out[i]) for i in range(len(peer_ids))]

    def index_in_use(self, local_index: int) -> bool:
        return bool(lib.wg_index_in_use(self._e, _u32(local_index, "local_index")))

    # The sans-IO core

    def input(self, data: bytes, src: Endpoint, now: float, local: Local | None = None) -> None:
        if not isinstance(data, bytes):
            raise EngineError(EINVAL, "data must be bytes")  # the batch path is io_recv
        ep = _endpoint_to_c(src, self._endpoint, local)
        self._call(lib.wg_input, data, len(data), ep, now)

    def send_raw(self, data: bytes, dst: Endpoint, local: Local | None = None) -> None:
        """Queue data for dst, leaving from our address local (None: the kernel picks)."""
        if not isinstance(data, bytes) or not data:
            raise EngineError(EINVAL, "data must be non-empty bytes")
        ep = _endpoint_to_c(dst, self._endpoint, local)
        self._call(lib.wg_send_raw, data, len(data), ep)

    def send_inner(self, packet: bytes, now: float) -> None:
        if not isinstance(packet, bytes) or not packet:
            raise EngineError(EINVAL, "packet must be non-empty bytes")
        self._call(lib.wg_send_inner, packet, len(packet), now)

    def tick(self, now: float) -> None:
        lib.wg_tick(self._e, now)

    @staticmethod
    def tune_allocator() -> None:
        """Process-wide allocator settings for many short connections (see wg_tune_allocator)."""
        lib.wg_tune_allocator()

    @staticmethod
    def trim_memory() -> None:
        """Return the C library's free memory to the system (see wg_trim_memory)."""
        lib.wg_trim_memory()

    def collect(self, now: float) -> Any:
        """A `wg_pending` (read its fields; valid until the next call) saying what waits."""
        lib.wg_collect(self._e, now, self._pending)
        return self._pending

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

    def outputs_local(self) -> list[tuple[bytes, Endpoint, Local | None]]:
        """outputs(), each with the local address it is to leave from."""
        e, buf, dst = self._e, self._out_buf, self._out_dst
        out: list[tuple[bytes, Endpoint, Local | None]] = []
        while (n := _check(lib.wg_next_output(e, buf, _OUTPUT_BUF_SIZE, dst), "outputs")) > 0:
            endpoint = _endpoint_from_c(dst)
            assert endpoint is not None
            out.append((ffi.buffer(buf, n)[:], endpoint, _local_from_c(dst)))
        return out

    def events(self) -> list[EngineEvent]:
        e, ev = self._e, self._event
        out: list[EngineEvent] = []
        while lib.wg_next_event(e, ev):
            data = ffi.buffer(ev.data, ev.len)[:]
            src, local = _endpoint_from_c(ev.src), _local_from_c(ev.src)
            out.append(EngineEvent(ev.type, ev.peer_id, ev.arg, src, data, local))
        return out

    def drop_counts(self) -> dict[str, int]:
        """The engine's drop counters, then the TCP stack's with a "tcp_" prefix."""
        out = self._drops
        lib.wg_all_drop_counts(self._e, out)  # one call: each call gives up the GIL
        return dict(zip(_DROP_NAMES, out, strict=True))

    def stats(self) -> dict[str, int]:
        out = ffi.new("wg_engine_stats *")
        lib.wg_engine_get_stats(self._e, out)
        return _fields(out)

    # TCP: connections peers open, driven through the engine's stack (handles are conn ids)

    def tcp_events(self, limit: int | None = None) -> list[tuple[int, int, int]]:
        """Every pending (TCP_EV_*, conn_id, arg) event, or the first `limit` (the rest stay
        pending in C); arg is TCP_CLOSE_* for CLOSED."""
        e = self._e
        if limit is not None:
            batch = min(limit, _TCP_EVENT_BATCH)
            n = _check(lib.wg_tcp_events(e, self._tcp_events, batch), "tcp_events")
            return [(ev.type, ev.conn_id, ev.arg) for ev in self._tcp_events[0:n]]
        return _pop_all(
            lambda buf, n: _check(lib.wg_tcp_events(e, buf, n), "tcp_events"),
            self._tcp_events,
            lambda ev: (ev.type, ev.conn_id, ev.arg),
        )

    def tcp_info(self, conn_id: int) -> TcpInfo:
        i = self._tcp_info
        self._conn_call(lib.tcp_get_info, conn_id, i)
        return TcpInfo(
            i.conn_id, i.peer_id, *_flow(i), i.state, i.bytes_in, i.bytes_out, i.close_reason
        )

    def tcp_accept(self, conn_id: int, now: float) -> None:
        self._conn_call(lib.tcp_accept, conn_id, now)

    def tcp_reject(self, conn_id: int, now: float) -> None:
        self._conn_call(lib.tcp_reject, conn_id, now)

    def tcp_read(self, conn_id: int, max_bytes: int, now: float) -> bytes | None:
        """Up to max_bytes; b"" at EOF, None when nothing is buffered yet (wait for READABLE)."""
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise EngineError(EINVAL, "max_bytes must be a positive int")
        cap = min(max_bytes, self._read_cap)
        n = lib.tcp_read(self._t, _u32(conn_id, "conn_id"), self._read_buf, cap, now)
        if n == TCP_EAGAIN:
            return None
        _tcp_check(n, "tcp_read")
        return ffi.buffer(self._read_buf, n)[:]

    def tcp_write(self, conn_id: int, data: bytes | memoryview, now: float) -> int:
        """Bytes accepted: fewer than offered when the send buffer is full (wait for WRITABLE)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise EngineError(EINVAL, "data must be bytes or a memoryview")
        source = data if isinstance(data, bytes) else ffi.from_buffer(data)
        return self._conn_call(lib.tcp_write, conn_id, source, len(source), now)

    def tcp_shutdown_write(self, conn_id: int, now: float) -> None:
        self._conn_call(lib.tcp_shutdown_write, conn_id, now)

    def tcp_abort(self, conn_id: int, now: float) -> None:
        self._conn_call(lib.tcp_abort, conn_id, now)

    def tcp_release(self, conn_id: int, now: float) -> None:
        self._conn_call(lib.tcp_release, conn_id, now)

    def tcp_flush(self, now: float) -> None:
        """Send the ACKs owed after a batch of `input` calls (io_recv does this itself)."""
        lib.tcp_flush(self._t, now)

    def tcp_stats(self) -> dict[str, int]:
        out = ffi.new("tcp_stats *")
        lib.tcp_get_stats(self._t, out)
        return _fields(out)

    def tcp_peer_counts(self, peer_id: int) -> tuple[int, int]:
        """(open, half-open) connections of a peer."""
        counts = ffi.new("uint32_t[2]")
        lib.tcp_peer_counts(self._t, _u32(peer_id, "peer_id"), counts, counts + 1)
        return counts[0], counts[1]

    def tcp_limit_refusals(self) -> int:
        """SYNs refused by a per-peer limit (connections or half-open), all peers together."""
        return lib.tcp_drop_count(self._t, lib.TCP_DROP_LIMIT_PEER) + lib.tcp_drop_count(
            self._t, lib.TCP_DROP_LIMIT_HALF_OPEN
        )

    def tcp_peer_limit_hits(self, peer_id: int) -> tuple[int, int]:
        """SYNs of a peer refused by (max connections, max half-open) since the engine began."""
        hits = ffi.new("uint64_t[2]")
        lib.tcp_peer_limit_hits(self._t, _u32(peer_id, "peer_id"), hits, hits + 1)
        return hits[0], hits[1]

    # Splices: relayed connections joined in C to a host socket (_splice.h)

    @property
    def can_splice(self) -> bool:
        return self._splice != ffi.NULL

    def splice_connect(self, conn_id: int, dst: Endpoint, deadline: float, now: float) -> None:
        """Hand a connection still awaiting its SYN's answer to C, which connects to dst and
        answers the SYN.  OSError when no socket could be started (the caller still owns the
        handle)."""
        ip, port = _ipv4_endpoint_to_c(dst, "dst")
        self._splice_call(lib.splice_connect, conn_id, ip, port, deadline, now)

    def splice_attach(self, conn_id: int, fd: int, now: float) -> None:
        """As `splice_connect` for a socket already connected: on success C owns fd (the
        caller must have detached it); OSError / EngineError leave fd with the caller."""
        self._splice_call(lib.splice_attach, conn_id, fd, now)

    def splice_adopt(self, conn_id: int, fd: int, now: float) -> None:
        """As `splice_attach` for a connection already accepted (ESTABLISHED or CLOSE_WAIT)
        whose bytes read so far the caller has sent to fd itself."""
        self._splice_call(lib.splice_adopt, conn_id, fd, now)

    def fast_relay_allow(
        self, peer_id: int, dst: Endpoint, expires: float | None, connect_timeout: float
    ) -> None:
        """Let the engine splice peer_id's SYNs to dst itself until expires (the engine's clock;
        None = until cleared), connecting with connect_timeout; reported by
        `fast_relay_opened`."""
        ip, port = _ipv4_endpoint_to_c(dst, "dst")
        until = expires or 0.0
        self._peer_call(lib.wg_fast_relay_allow, peer_id, ip, port, until, connect_timeout)

    def fast_relay_clear(self) -> None:
        """Forget every fast-relay approval (the rules behind them changed)."""
        lib.wg_fast_relay_clear(self._e)

    def fast_relay_bound(self, per_peer: int, total: int) -> None:
        """Fast-relay a SYN only while its peer has at most per_peer open connections and the
        engine at most total (0: no bound); past either, it is raised to the owner."""
        lib.wg_fast_relay_bound(self._e, _u32(per_peer, "per_peer"), _u32(total, "total"))

    def fast_relay_opened(self) -> list[FastOpen]:
        """Connections the engine spliced on its own since the last call, oldest first."""
        e = self._e
        return _pop_all(
            lambda buf, n: lib.wg_fast_relay_opened(e, buf, n),
            self._fast_opened,
            lambda r: FastOpen(r.conn_id, r.peer_id, *_flow(r), r.opened_at),
        )

    def splice_fd(self) -> int:
        """The epoll fd to watch for readability (answer with `splice_service`)."""
        return lib.splice_fd(self._splice)

    def splice_service(self, now: float) -> None:
        """The sockets' news: move bytes, end what is done, send what that produced."""
        lib.wg_splice_service(self._e, now)

    def splice_results(self, now: float) -> list[SpliceResult]:
        """Run what TCP events left pending, then every ended connection since the last call."""
        if self._splice == ffi.NULL:
            return []
        lib.splice_run(self._splice, now)
        splice = self._splice
        return _pop_all(
            lambda buf, n: lib.splice_results(splice, buf, n),
            self._splice_results,
            lambda r: SpliceResult(
                r.conn_id, r.outcome, r.error, r.tcp_close, r.bytes_up, r.bytes_down, r.ended_at
            ),
        )

    def splice_bytes(self, conn_id: int) -> tuple[int, int] | None:
        """Live (up, down) byte counts of a spliced connection, None if it is not spliced."""
        counts = ffi.new("uint64_t[2]")
        if self._splice == ffi.NULL:
            return None
        if lib.splice_bytes(self._splice, _u32(conn_id, "conn_id"), counts, counts + 1) != 0:
            return None
        return counts[0], counts[1]

    def splice_active_flows(self, since: float) -> dict[int, tuple[int, int]]:
        """{conn_id: (up, down)} of spliced connections whose bytes moved at or after since."""
        count = lib.splice_active(self._splice) if self._splice != ffi.NULL else 0
        if count == 0:
            return {}
        out = ffi.new("splice_progress[]", count)
        n = lib.splice_list_active(self._splice, since, out, count)
        return {out[i].conn_id: (out[i].bytes_up, out[i].bytes_down) for i in range(n)}

    def splice_abort(self, conn_id: int, now: float) -> bool:
        """Reset both sides of a spliced connection now; False if it was not spliced."""
        if self._splice == ffi.NULL:
            return False
        return lib.splice_abort(self._splice, _u32(conn_id, "conn_id"), now) == 0

    def splice_active(self) -> int:
        return lib.splice_active(self._splice)

    # UDP and ICMP errors

    def udp_datagrams(self) -> list[UdpMeta]:
        """Every UDP datagram from peers since the last call (one C call, each byte copied once)."""
        meta = self._udp_meta
        n = self._call(lib.wg_udp_drain, meta, lib.WG_UDP_QUEUE_MAX, self._udp_arena)
        if n == 0:
            return []
        arena = ffi.buffer(self._udp_arena[0], lib.WG_UDP_ARENA_SIZE)  # a view: no copy yet
        return [
            UdpMeta(m.peer_id, *_flow(m), arena[m.offset : m.offset + m.len])
            for m in (meta[i] for i in range(n))
        ]

    def udp_send(self, src: Endpoint, dst: Endpoint, data: bytes, now: float) -> None:
        """A datagram to a peer: src = (the original destination ip, port), dst = (the peer's
        tunnel ip, port), both IPv4 or both IPv6.  EngineError(EMSGSIZE) when it would not fit
        in the MTU."""
        family, src_addr, src_port, dst_addr, dst_port = _addr_pair(src, dst)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise EngineError(EINVAL, "data must be bytes")
        source = data if isinstance(data, bytes) else ffi.from_buffer(data)
        self._call(
            lib.wg_udp_send_addr,
            family, src_addr, src_port, dst_addr, dst_port, source, len(source), now,
        )  # fmt: skip

    def icmp_unreachable(
        self, peer: Endpoint, dst: Endpoint, proto: int, code: int, now: float
    ) -> None:
        """ICMP destination unreachable (code: ICMP_PORT_UNREACHABLE, ICMP_ADMIN_PROHIBITED,
        ICMP_HOST_UNREACHABLE...) to the peer's (ip, port), as if from dst, about its proto flow."""
        family, peer_ip, peer_port, dst_ip, dst_port = _addr_pair(peer, dst)
        if not isinstance(proto, int) or not 0 <= proto < 256:
            raise EngineError(EINVAL, "proto must be 0..255")
        if not isinstance(code, int) or not 0 <= code < 16:
            raise EngineError(EINVAL, "code must be 0..15")
        self._call(
            lib.wg_icmp_unreachable_addr,
            family, peer_ip, peer_port, dst_ip, dst_port, proto, code, now,
        )  # fmt: skip

    # The IO helper over a UDP socket Python owns

    def io_attach(self, fd: int, family: int) -> None:
        if family not in (4, 6):
            raise EngineError(EINVAL, "family must be 4 or 6")
        if not isinstance(fd, int) or fd < 0:
            raise EngineError(EINVAL, "fd must be a non-negative integer")
        self._call(lib.wg_io_attach, fd, family)

    def io_recv(self, now: float, max_datagrams: int = 4096) -> int:
        if not isinstance(max_datagrams, int) or not 0 < max_datagrams < 2**31:
            raise EngineError(EINVAL, "max_datagrams must be a positive int")
        code = lib.wg_io_recv(self._e, now, max_datagrams)
        if code == EIO:
            raise EngineError(EIO, "io_recv")
        if code < 0:
            raise OSError(-code, f"io_recv: socket error {-code}")
        return code

    def io_flush(self) -> int:
        return self._call(lib.wg_io_flush)


F = TypeVar("F", bound=Callable[..., Any])

# Not serialized: the thread's own controls, and what touches no engine state.
_UNLOCKED = frozenset({"close", "worker_start", "worker_stop", "worker_stats", "locked"})


def _serialized(fn: F) -> F:
    """`fn` under the engine lock while the worker runs (see Engine.locked)."""

    @functools.wraps(fn)
    def call(self: Engine, *args: Any, **kwargs: Any) -> Any:
        taken = self._take_lock()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self._give_lock(taken)

    return call  # type: ignore[return-value]


for _name, _member in list(vars(Engine).items()):
    if inspect.isfunction(_member) and not _name.startswith("_") and _name not in _UNLOCKED:
        setattr(Engine, _name, _serialized(_member))
