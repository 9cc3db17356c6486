"""The hostname <-> virtual IP map: which 10.78.x.y address the DNS service gave which name, and
to which peers.

`VipAllocator` is sans-IO (time is a parameter, "is this VIP in use" a callback) and is checked
against a slow reference in the tests.

Who may use a VIP: only the peers our DNS answered it to. Each A answer is a *grant* (VIP,
peer), renewed by every answer of that name to that peer and kept for `window` after the last
one. Without a grant a VIP is nothing to a peer: its PTR is NXDOMAIN, connections and datagrams
to it are refused, TLS to it learns no hostname. So one peer cannot read another's lookups from
the map, nor reach the hosts they resolved.

Which address: a random one of the free set (every address of the VIP network but the network
and broadcast addresses and any whose last octet is 0 or 255, which some clients and middleboxes
treat as broadcast-like even inside a /16), so an address says nothing about the ones near it.
The free set is a virtual array picked at a random index and swapped with its last element
(O(1)); only the positions that differ from "the i-th usable address" are stored, so an empty
map costs nothing and a full one a dict entry per address moved.

How many: a peer holds at most `peer_share` grants; past it its new names fail (the DNS service
answers SERVFAIL) until its older grants expire. A name another peer already holds costs a
grant too, but no address.

When an address is free again: once it has no grant left, `window` has passed since its last
answer to any peer and no flow to it is open. `window` is the stale-answer window (24 h): our
TTL is 30 s, but browsers, runtimes and stub resolvers keep answers far longer (across sleep,
in connection pools), and a VIP recycled under such a client sends its next plaintext
connection to a host it never asked for. Until then a name keeps its VIP: asked again, by any
peer, it gets the same one. Grants expire in answer order (an ordered dict, oldest first); each
call sweeps at most `SWEEP_BATCH` of them, and a peer at its share first drops its own expired
grants (each grant is dropped once: amortised O(1)), so no call's cost grows with the pool.

The file (`vips.json` in the state dir, atomic, 0600): version 2 keeps the grants (peers by
public key, once, and by index in the entries) so the rules above hold across restarts. The
service writes it off the event loop: `snapshot` copies the maps on the loop (dict copies, in
C), `encode` builds the JSON in a worker thread, in slices so the loop gets the GIL between
them. The answer times on disk may lag by `TIMES_LAG` (the service writes time-only changes
that often): loaded times are moved forward by it, so a restart never shortens a window.
Version 1 files (no grants) are migrated with every entry given to no peer until asked again:
the names keep their VIPs and are not recycled within the window of their last answer, but no
peer can use one before our DNS answers it that name again. "Given to every peer" would keep
the few clients holding an answer across the upgrade working for their TTL (30 s) at the price
of showing every peer every name looked up before it, exactly the leak this closes, and of
putting every peer over its share at once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unclaw_tui.config import VIP_NETWORK
from unclaw_tui.engine.outcomes import Refusal
from unclaw_tui.state import StateError

if TYPE_CHECKING:
    from unclaw_tui.state import StateDir

log = logging.getLogger(__name__)

VIPS_FILE = "vips.json"
VIPS_VERSION = 2
VIP_TTL = 30  # seconds: the TTL of our A answers
NO_RECYCLE_WINDOW = 24 * 3600.0  # seconds: a grant's life after its last answer (see above)
# Grants a peer may hold: 1/16 of the 65,024 addresses, so one peer (or 15) cannot fill the
# pool; a person's devices ask a few hundred to a couple of thousand distinct names a day.
PEER_VIP_SHARE = 4096
SWEEP_BATCH = 256  # expired grants / idle VIPs looked at per call, at most
TIMES_LAG = 61.0  # seconds the file's answer times may lag behind (the service's save cadence)
MAX_POOL = 1 << 24  # a /8: the free set's positions are computed, not stored
ENCODE_SLICE = 1024  # entries per json.dumps call in `encode` (the GIL is held within one)
GATEWAY_PEER = b""  # the grantee of callers that are no peer (benchmarks, tools)


def normalize_hostname(name: str) -> str:
    """Lower case, no trailing dot: the form hostnames take in the map and the events."""
    return name.rstrip(".").lower()


def usable(ip: int, network: ipaddress.IPv4Network) -> bool:
    """Whether the address may be handed out (see the module docstring)."""
    net = int(network.network_address)
    bcast = int(network.broadcast_address)
    return net < ip < bcast and (ip & 0xFF) not in (0, 0xFF)


@dataclass(frozen=True, slots=True)
class NoVip:
    """Why `allocate` gave no VIP (the DNS event's error)."""

    why: str


@dataclass(frozen=True, slots=True)
class VipSnapshot:
    """The map at one moment, cheap to take on the loop; `encode` turns it into the file."""

    network: str
    hosts: dict[int, str]  # ip -> hostname
    last: dict[int, float]  # ip -> last answer to any peer
    grants: dict[tuple[int, bytes], float]  # (ip, peer) -> last answer to that peer


def _addr(ip: int) -> str:
    return str(ipaddress.IPv4Address(ip))


def _ip_int(ip: str) -> int | None:
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return None


class VipAllocator:
    """Hostname <-> VIP, and which peers were given each VIP (see the module docstring)."""

    def __init__(
        self,
        network: str | ipaddress.IPv4Network = VIP_NETWORK,
        *,
        window: float = NO_RECYCLE_WINDOW,
        peer_share: int = PEER_VIP_SHARE,
        randbelow: Callable[[int], int] = secrets.randbelow,
    ) -> None:
        self.network = ipaddress.IPv4Network(network)
        if self.network.num_addresses > MAX_POOL:
            raise ValueError(f"VIP network {self.network} is larger than a /8")
        net = self.network
        self._base = int(net.network_address)
        # Usable addresses in order: arithmetic in /24 blocks (254 each), a list below a /24.
        self._small: list[int] | None = None
        if net.prefixlen > 24:
            self._small = [
                ip
                for ip in range(int(net.network_address) + 1, int(net.broadcast_address))
                if usable(ip, net)
            ]
            self._pool = len(self._small)
        else:
            self._pool = net.num_addresses // 256 * 254
        self.window = window
        self.peer_share = peer_share
        self._randbelow = randbelow
        self._host: dict[int, str] = {}  # ip -> hostname
        self._ip: dict[str, int] = {}  # hostname -> ip
        self._last: dict[int, float] = {}  # ip -> last answer to any peer (wall clock)
        # (ip, peer) -> last answer to that peer; the same keys least recently answered first
        # (apart: a plain dict copies several times faster than an OrderedDict, see snapshot).
        self._grants: dict[tuple[int, bytes], float] = {}
        self._order: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        self._by_peer: dict[bytes, OrderedDict[int, None]] = {}  # the same, per peer
        self._holders: dict[int, int] = {}  # ip -> number of grants
        self._idle: OrderedDict[int, None] = OrderedDict()  # mapped, no grant; oldest first
        # The free set: positions 0 .. _n-1 of a virtual array, position i holding _moved[i]
        # if present, else the i-th usable address.
        self._n = self._pool
        self._moved: dict[int, int] = {}
        self.changes = 0  # bumped when a mapping or grant appears or goes: the file is stale
        self.touches = 0  # bumped when only an answer time moved

    def __len__(self) -> int:
        return len(self._host)

    @property
    def free(self) -> int:
        return self._n

    def held_by(self, peer: bytes) -> int:
        """Grants the peer holds (expired ones count until swept)."""
        mine = self._by_peer.get(peer)
        return 0 if mine is None else len(mine)

    def vip_for(self, hostname: str) -> str | None:
        """The hostname's VIP, whoever it was given to (for the operator and the tests)."""
        ip = self._ip.get(hostname)
        return None if ip is None else _addr(ip)

    def hostname_for(self, ip: str, peer: bytes) -> str | None:
        """The VIP's hostname if our DNS gave the VIP to `peer`; else None, as for an address
        that is no VIP."""
        addr = _ip_int(ip)
        if addr is None or (addr, peer) not in self._grants:
            return None
        return self._host[addr]

    def allocate(
        self,
        hostname: str,
        now: float,
        in_use: Callable[[str], bool],
        *,
        peer: bytes = GATEWAY_PEER,
    ) -> str | NoVip:
        """The hostname's VIP, given (or given again) to `peer` at `now`: made or kept as
        needed; NoVip when the peer is at its share or no address is free."""
        self._sweep(now, in_use)
        ip = self._ip.get(hostname)
        if ip is not None and (ip, peer) in self._grants:
            self._renew(ip, peer, now)
            return _addr(ip)
        if self.held_by(peer) >= self.peer_share:
            self._expire_peer(peer, now)
            if self.held_by(peer) >= self.peer_share:
                window_h = self.window / 3600
                return NoVip(
                    Refusal.SHARE.says(f"{self.peer_share} VIPs answered within {window_h:g} h")
                )
        if ip is None:
            ip = self._take_free()
            if ip is None:
                return NoVip("VIP pool exhausted")
            self._host[ip] = hostname
            self._ip[hostname] = ip
        self._grant(ip, peer, now)
        return _addr(ip)

    # -- persistence (the document; the IO is the caller's) --------------------------------

    def snapshot(self) -> VipSnapshot:
        """The map as it is now, for `encode` in another thread: plain dict copies (C loops,
        about 1 ms per 10,000 entries), nothing per entry in Python."""
        return VipSnapshot(
            str(self.network), dict(self._host), dict(self._last), dict(self._grants)
        )

    def to_json(self) -> dict[str, Any]:
        return document(self.snapshot())

    def load_json(self, doc: Any) -> int:
        """Take the mappings and grants of a saved document (version 1: mappings only, given
        to no peer); entries that do not fit this network, malformed ones and duplicates are
        skipped. Returns how many were skipped. Answer times move forward by TIMES_LAG."""
        if not isinstance(doc, dict) or doc.get("version") not in (1, VIPS_VERSION):
            raise ValueError("not a vips document of a known version")
        items = doc.get("vips")
        if not isinstance(items, list):
            raise ValueError("'vips' is not a list")
        peers = _parse_peers(doc.get("peers", []))
        skipped = 0
        idle: list[tuple[float, int]] = []
        grants: list[tuple[float, int, bytes]] = []
        for item in items:
            parsed = self._parse_entry(item, peers)
            if parsed is None or parsed[0] in self._ip or parsed[1] in self._host:
                skipped += 1
                continue
            hostname, ip, last, given = parsed
            self._host[ip] = hostname
            self._ip[hostname] = ip
            self._last[ip] = max([last, *(t for _, t in given)]) + TIMES_LAG
            if given:
                grants.extend((t + TIMES_LAG, ip, peer) for peer, t in given)
            else:
                idle.append((self._last[ip], ip))
        # Oldest first, as if answered in that order; the file's order breaks ties.
        for t, ip, peer in sorted(grants, key=lambda g: g[0]):
            self._add_grant(ip, peer, t)
        for _, ip in sorted(idle, key=lambda g: g[0]):
            self._idle[ip] = None
        self._refill_free()
        return skipped

    def _parse_entry(
        self, item: Any, peers: list[bytes | None]
    ) -> tuple[str, int, float, list[tuple[bytes, float]]] | None:
        if not isinstance(item, dict):
            return None
        hostname, ip, last_used = item.get("hostname"), item.get("ip"), item.get("last_used")
        if (
            not isinstance(hostname, str)
            or not hostname
            or hostname != normalize_hostname(hostname)
        ):
            return None
        if not _is_time(last_used) or not isinstance(ip, str):
            return None
        addr = _ip_int(ip)
        if addr is None or not usable(addr, self.network):
            return None
        given: dict[bytes, float] = {}
        raw = item.get("given", [])
        if not isinstance(raw, list):
            return None
        for pair in raw:
            # A bad grant costs only itself: the peer asks the name again.
            if not isinstance(pair, list) or len(pair) != 2:
                continue
            index, t = pair
            if isinstance(index, bool) or not isinstance(index, int) or not _is_time(t):
                continue
            if 0 <= index < len(peers) and (peer := peers[index]) is not None:
                given[peer] = max(given.get(peer, t), t)
        return hostname, addr, float(last_used), [(p, float(t)) for p, t in given.items()]

    # -- internals -------------------------------------------------------------------------

    def _nth(self, i: int) -> int:
        """The i-th usable address."""
        if self._small is not None:
            return self._small[i]
        return self._base + (i // 254) * 256 + i % 254 + 1

    def _index(self, ip: int) -> int:
        """Which usable address `ip` is (the inverse of _nth)."""
        if self._small is not None:
            return self._small.index(ip)
        off = ip - self._base
        return (off >> 8) * 254 + (off & 0xFF) - 1

    def _at(self, i: int) -> int:
        ip = self._moved.get(i)
        return self._nth(i) if ip is None else ip

    def _remove_at(self, i: int) -> int:
        """Take position i out of the free set: the last one moves into it."""
        last = self._n - 1
        ip = self._at(i)
        if i != last:
            self._moved[i] = self._at(last)
        self._moved.pop(last, None)
        self._n = last
        return ip

    def _refill_free(self) -> None:
        """Every usable address not mapped (at start and after a load: O(mapped))."""
        self._n, self._moved = self._pool, {}
        # Highest first: positions above the one removed are gone already, so neither the one
        # removed nor the last one has moved from where the identity put it, but for the moves
        # made here into removed positions (which hold addresses not mapped).
        for i in sorted((self._index(ip) for ip in self._host), reverse=True):
            self._remove_at(i)

    def _take_free(self) -> int | None:
        if not self._n:
            return None
        return self._remove_at(self._randbelow(self._n))

    def _give_back(self, ip: int) -> None:
        n = self._n  # < the pool: ip was taken from it
        if ip != self._nth(n):
            self._moved[n] = ip
        self._n = n + 1

    def _add_grant(self, ip: int, peer: bytes, t: float) -> None:
        self._grants[(ip, peer)] = t
        self._order[(ip, peer)] = None
        self._by_peer.setdefault(peer, OrderedDict())[ip] = None
        self._holders[ip] = self._holders.get(ip, 0) + 1
        self._idle.pop(ip, None)

    def _grant(self, ip: int, peer: bytes, now: float) -> None:
        self._add_grant(ip, peer, now)
        self._last[ip] = max(self._last.get(ip, now), now)
        self.changes += 1

    def _renew(self, ip: int, peer: bytes, now: float) -> None:
        key = (ip, peer)
        # max: a clock stepped back must not shorten a window.
        self._grants[key] = max(self._grants[key], now)
        self._order.move_to_end(key)
        self._by_peer[peer].move_to_end(ip)
        self._last[ip] = max(self._last[ip], now)
        self.touches += 1

    def _drop(self, ip: int, peer: bytes) -> None:
        del self._grants[(ip, peer)]
        del self._order[(ip, peer)]
        mine = self._by_peer[peer]
        del mine[ip]
        if not mine:
            del self._by_peer[peer]
        left = self._holders[ip] - 1
        if left:
            self._holders[ip] = left
        else:
            del self._holders[ip]
            self._idle[ip] = None  # free once its window has passed and no flow is open
        self.changes += 1

    def _expire_peer(self, peer: bytes, now: float) -> None:
        """Drop the peer's expired grants (oldest first, each once)."""
        cutoff = now - self.window
        mine = self._by_peer.get(peer)
        while mine:
            ip = next(iter(mine))
            if self._grants[(ip, peer)] > cutoff:
                break
            self._drop(ip, peer)
            mine = self._by_peer.get(peer)

    def _sweep(self, now: float, in_use: Callable[[str], bool]) -> None:
        """Drop expired grants, then free idle VIPs past their window: SWEEP_BATCH of each at
        most."""
        cutoff = now - self.window
        budget = SWEEP_BATCH
        order = self._order
        while budget and order:
            key = next(iter(order))
            if self._grants[key] > cutoff:
                break
            self._drop(*key)
            budget -= 1
        budget = SWEEP_BATCH
        idle = self._idle
        while budget and idle:
            ip = next(iter(idle))
            if self._last[ip] > cutoff:
                break  # the rest are newer (or about: a late one waits, never the other way)
            budget -= 1
            if in_use(_addr(ip)):
                # A flow is open to it: counts as use, the window starts again.
                self._last[ip] = now
                idle.move_to_end(ip)
                self.changes += 1
                continue
            del idle[ip]
            del self._ip[self._host.pop(ip)]
            del self._last[ip]
            self._give_back(ip)  # picked at random like the rest: no order to learn
            self.changes += 1


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_peers(raw: Any) -> list[bytes | None]:
    if not isinstance(raw, list):
        raise ValueError("'peers' is not a list")
    out: list[bytes | None] = []
    for item in raw:
        key: bytes | None = None
        if isinstance(item, str) and len(item) <= 88:
            with contextlib.suppress(binascii.Error, ValueError):
                key = base64.b64decode(item, validate=True)
        out.append(key)
    return out


def document(snap: VipSnapshot) -> dict[str, Any]:
    """The version 2 document of a snapshot (see the module docstring)."""
    index: dict[bytes, int] = {}
    given: dict[int, list[list[Any]]] = {}
    for (ip, peer), t in snap.grants.items():
        i = index.setdefault(peer, len(index))
        given.setdefault(ip, []).append([i, t])
    return {
        "version": VIPS_VERSION,
        "network": snap.network,
        "peers": [base64.b64encode(p).decode() for p in index],
        "vips": [
            {
                "hostname": host,
                "ip": _addr(ip),
                "last_used": snap.last[ip],
                "given": given.get(ip, []),
            }
            for ip, host in snap.hosts.items()
        ],
    }


def encode(snap: VipSnapshot) -> bytes:
    """`document` as compact JSON, built ENCODE_SLICE entries per json.dumps call: the C
    encoder holds the GIL for a whole call, and this runs beside the event loop."""
    doc = document(snap)
    entries = doc.pop("vips")
    head = json.dumps(doc)[:-1]  # without its closing brace
    parts = [head, ', "vips": [']
    for start in range(0, len(entries), ENCODE_SLICE):
        if start:
            parts.append(", ")
        parts.append(json.dumps(entries[start : start + ENCODE_SLICE])[1:-1])
    parts.append("]}\n")
    return "".join(parts).encode()


# --- the state dir file -----------------------------------------------------------------------


def load(state: StateDir, allocator: VipAllocator) -> None:
    """Fill the allocator from vips.json, if there is one. A damaged file is logged and set
    aside (the map starts empty) rather than stopping the gateway: the worst outcome is that
    clients' cached answers point at VIPs the gateway no longer knows (refused, not misrouted:
    no peer holds a grant for them)."""
    try:
        doc = state.read_json(VIPS_FILE)
        if doc is None:
            return
        skipped = allocator.load_json(doc)
    except (StateError, ValueError) as exc:
        log.warning("ignoring %s: %s", VIPS_FILE, exc)
        return
    if skipped:
        log.warning(
            "%s: skipped %d entries outside %s or malformed", VIPS_FILE, skipped, allocator.network
        )


def save(state: StateDir, snap: VipSnapshot) -> bool:
    """Encode and write vips.json atomically with mode 0600 (blocking: run it in a thread).
    A failure is logged, and False: the map lives on in memory."""
    try:
        data = encode(snap)
        with state.locked():
            state.write_bytes(VIPS_FILE, data)
    except StateError as exc:
        log.error("cannot save the VIP map: %s", exc)
        return False
    return True
