"""The hostname <-> virtual IP map: which 10.78.x.y address the DNS service gave which name.

`VipAllocator` is sans-IO (time is a parameter, "is this VIP in use" a callback) and is checked
against a slow reference in the tests. A hostname keeps its VIP for as long as the map holds it,
and the map is persisted (`vips.json` in the state dir, atomic, 0600), so the answers clients
cached stay valid across gateway restarts.

Addresses handed out: every address of the VIP network except the network and broadcast
addresses and any address whose last octet is 0 or 255 (some clients and middleboxes treat
those as broadcast-like even inside a /16), lowest first. Once every address has been handed
out, a new hostname takes the least recently used VIP that has no open flow and was not used
within `min_idle` seconds (a client may still hold that DNS answer in its cache: the DNS TTL is
30 s); when no VIP qualifies the allocation fails (the DNS service answers SERVFAIL).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unclaw_tui.config import VIP_NETWORK
from unclaw_tui.state import StateError

if TYPE_CHECKING:
    from unclaw_tui.state import StateDir

log = logging.getLogger(__name__)

VIPS_FILE = "vips.json"
VIPS_VERSION = 1
VIP_TTL = 30  # seconds: the TTL of our A answers, and the least idle time before a VIP is reused


def normalize_hostname(name: str) -> str:
    """Lower case, no trailing dot: the form hostnames take in the map and the events."""
    return name.rstrip(".").lower()


def usable(ip: int, network: ipaddress.IPv4Network) -> bool:
    """Whether the address may be handed out (see the module docstring)."""
    net = int(network.network_address)
    bcast = int(network.broadcast_address)
    return net < ip < bcast and (ip & 0xFF) not in (0, 0xFF)


@dataclass(slots=True)
class VipEntry:
    hostname: str
    ip: int
    last_used: float  # wall clock, so it means something after a restart


class VipAllocator:
    """Hostname <-> VIP, with LRU reuse once the pool is exhausted (see the module docstring)."""

    def __init__(
        self, network: str | ipaddress.IPv4Network = VIP_NETWORK, *, min_idle: float = VIP_TTL
    ) -> None:
        self.network = ipaddress.IPv4Network(network)
        self.min_idle = min_idle
        self._by_host: dict[str, VipEntry] = {}
        self._by_ip: dict[int, VipEntry] = {}
        self._lru: OrderedDict[int, VipEntry] = OrderedDict()  # least recently used first
        self._cursor = int(self.network.network_address)  # below it every address is taken
        self.changes = 0  # bumped on every new or moved mapping: the persisted form is stale

    def __len__(self) -> int:
        return len(self._by_host)

    def vip_for(self, hostname: str) -> str | None:
        entry = self._by_host.get(hostname)
        return None if entry is None else str(ipaddress.IPv4Address(entry.ip))

    def hostname_for(self, ip: str) -> str | None:
        with contextlib.suppress(ValueError):
            entry = self._by_ip.get(int(ipaddress.IPv4Address(ip)))
            return None if entry is None else entry.hostname
        return None

    def touch(self, ip: str, now: float) -> None:
        """A flow or an answer used this VIP: it becomes the most recently used."""
        with contextlib.suppress(ValueError):
            entry = self._by_ip.get(int(ipaddress.IPv4Address(ip)))
            if entry is not None:
                self._use(entry, now)

    def allocate(self, hostname: str, now: float, in_use: Callable[[str], bool]) -> str | None:
        """The hostname's VIP (made or reused as needed, and marked used), or None when the
        pool is exhausted and no VIP may be taken back."""
        entry = self._by_host.get(hostname)
        if entry is None:
            ip = self._fresh()
            if ip is None:
                victim = self._victim(now, in_use)
                if victim is None:
                    return None
                self._forget(victim)
                ip = victim.ip
            entry = VipEntry(hostname, ip, now)
            self._by_host[hostname] = entry
            self._by_ip[ip] = entry
            self.changes += 1
        self._use(entry, now)
        return str(ipaddress.IPv4Address(entry.ip))

    # -- persistence (the document; the IO is the service's) -------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VIPS_VERSION,
            "network": str(self.network),
            "vips": [
                {
                    "hostname": e.hostname,
                    "ip": str(ipaddress.IPv4Address(e.ip)),
                    "last_used": e.last_used,
                }
                for e in self._lru.values()
            ],
        }

    def load_json(self, doc: Any) -> int:
        """Take the mappings of a saved document; entries that do not fit this network (or are
        malformed or duplicates) are skipped. Returns how many were skipped."""
        if not isinstance(doc, dict) or doc.get("version") != VIPS_VERSION:
            raise ValueError("not a vips document of a known version")
        items = doc.get("vips")
        if not isinstance(items, list):
            raise ValueError("'vips' is not a list")
        loaded: list[VipEntry] = []
        skipped = 0
        for item in items:
            entry = self._parse_entry(item)
            if entry is None or entry.hostname in self._by_host or entry.ip in self._by_ip:
                skipped += 1
                continue
            self._by_host[entry.hostname] = entry
            self._by_ip[entry.ip] = entry
            loaded.append(entry)
        # Least recently used first; the file's order breaks ties.
        for entry in sorted(loaded, key=lambda e: e.last_used):
            self._lru[entry.ip] = entry
        return skipped

    def _parse_entry(self, item: Any) -> VipEntry | None:
        if not isinstance(item, dict):
            return None
        hostname, ip, last_used = item.get("hostname"), item.get("ip"), item.get("last_used")
        if (
            not isinstance(hostname, str)
            or not hostname
            or hostname != normalize_hostname(hostname)
        ):
            return None
        if not isinstance(last_used, int | float) or isinstance(last_used, bool):
            return None
        try:
            addr = int(ipaddress.IPv4Address(ip))
        except ValueError:
            return None
        if not usable(addr, self.network):
            return None
        return VipEntry(hostname, addr, float(last_used))

    # -- internals -------------------------------------------------------------------------

    def _use(self, entry: VipEntry, now: float) -> None:
        entry.last_used = max(entry.last_used, now)
        self._lru[entry.ip] = entry
        self._lru.move_to_end(entry.ip)

    def _fresh(self) -> int | None:
        """The lowest usable address never handed out (addresses are only ever moved between
        hostnames, never freed, so a cursor suffices)."""
        end = int(self.network.broadcast_address)
        while self._cursor < end:
            self._cursor += 1
            ip = self._cursor
            if usable(ip, self.network) and ip not in self._by_ip:
                return ip
        return None

    def _victim(self, now: float, in_use: Callable[[str], bool]) -> VipEntry | None:
        for entry in self._lru.values():
            if now - entry.last_used < self.min_idle:
                continue  # its answer may still sit in a client's cache
            if not in_use(str(ipaddress.IPv4Address(entry.ip))):
                return entry
        return None

    def _forget(self, entry: VipEntry) -> None:
        del self._by_host[entry.hostname]
        del self._by_ip[entry.ip]
        del self._lru[entry.ip]


# --- the state dir file -----------------------------------------------------------------------


def load(state: StateDir, allocator: VipAllocator) -> None:
    """Fill the allocator from vips.json, if there is one. A damaged file is logged and set
    aside (the map starts empty) rather than stopping the gateway: the worst outcome is that
    clients' cached answers point at VIPs the gateway no longer knows for 30 s."""
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


def save(state: StateDir, doc: dict[str, Any]) -> bool:
    """Write vips.json atomically with mode 0600 (blocking: fsync and the state dir lock).
    A failure is logged, and False: the map lives on in memory."""
    try:
        with state.locked():
            state.write_json(VIPS_FILE, doc)
    except StateError as exc:
        log.error("cannot save the VIP map: %s", exc)
        return False
    return True
