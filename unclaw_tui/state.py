"""The state directory: gateway identity, peers and live stats as small JSON files.

Every file is written atomically (temp file in the same dir, fsync, rename, fsync the dir) with
mode 0600, so a `kill -9` at any moment leaves either the old or the new file, never a partial
one.  Read-modify-write cycles hold an `fcntl.flock` on `.lock`, so the CLI and a running
gateway (or two CLIs) never lose each other's changes.  Readers need no lock: a rename is atomic.

Operations validate everything before writing, so a failing operation leaves the dir untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from unclaw_tui import keys

GATEWAY_FILE = "gateway.json"
PEERS_FILE = "peers.json"
STATS_FILE = "stats.json"
LOCK_FILE = ".lock"
PEERS_VERSION = 1
SETTING_KEYS = ("listen_port", "endpoint", "address")
MIN_PREFIX = 8
MAX_PREFIX = 30

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_TMP_SUFFIX = ".tmp"


class StateError(Exception):
    """A problem with the state dir or its files; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class PeerRecord:
    name: str
    public_key: str
    private_key: str = field(repr=False)
    preshared_key: str = field(repr=False)
    ip: str
    created: float
    # What a flow no rule decides gets (issue 14): allow, deny, or ask the operator; for ask,
    # `fallback` (allow or deny) when no answer comes in time.
    policy: str = "allow"
    fallback: str = "deny"


PEER_POLICIES = ("allow", "deny", "ask")
PEER_FALLBACKS = ("allow", "deny")


@dataclass(frozen=True, slots=True)
class GatewayIdentity:
    private_key: str = field(repr=False)
    public_key: str


@dataclass(frozen=True, slots=True)
class PeerRuntime:
    endpoint: str | None = None
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0


COUNTERS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")


# --- pure validation, usable before any state dir exists ------------------------------------


def validate_peer_name(name: str) -> str:
    """ValueError unless name is 1..32 of [A-Za-z0-9._-] starting with a letter or digit."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid peer name {name!r}: use 1-32 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_address(value: str) -> ipaddress.IPv4Interface:
    """Parse the gateway's tunnel interface address "A.B.C.D/N" (N in 8..30, a host address)."""
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(
            f"invalid address {value!r}: expected A.B.C.D/N, e.g. 10.77.0.1/24"
        ) from None
    if "/" not in value or not MIN_PREFIX <= iface.network.prefixlen <= MAX_PREFIX:
        raise ValueError(
            f"invalid address {value!r}: the prefix length must be {MIN_PREFIX}..{MAX_PREFIX}"
        )
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ValueError(f"invalid address {value!r}: the gateway needs a host address of the net")
    return iface


def validate_peer_policy(policy: str | None, fallback: str | None) -> None:
    """ValueError unless policy is allow/deny/ask and fallback allow/deny (None: not given)."""
    if policy is not None and policy not in PEER_POLICIES:
        raise ValueError(f"invalid policy {policy!r}: expected allow, deny or ask")
    if fallback is not None and fallback not in PEER_FALLBACKS:
        raise ValueError(f"invalid fallback {fallback!r}: expected allow or deny")


def validate_listen_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"invalid listen port {value!r}: expected 1..65535")
    return value


def parse_ipv4(ip: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(ip)
    except ValueError:
        raise ValueError(f"invalid IP {ip!r}: expected an IPv4 address like 10.77.0.2") from None


def validate_peer_ip(
    ip: str, network: ipaddress.IPv4Network, gateway_ip: ipaddress.IPv4Address
) -> ipaddress.IPv4Address:
    """Check a requested peer IP against the tunnel net (not whether it is in use)."""
    addr = parse_ipv4(ip)
    if addr not in network:
        raise ValueError(f"IP {addr} is not in the tunnel network {network}")
    if addr == network.network_address:
        raise ValueError(f"IP {addr} is the network address of {network}")
    if addr == network.broadcast_address:
        raise ValueError(f"IP {addr} is the broadcast address of {network}")
    if addr == gateway_ip:
        raise ValueError(f"IP {addr} is the gateway's own address")
    return addr


# --- file parsing: malformed content becomes a StateError naming the file ------------------


def _require(cond: bool, filename: str, what: str) -> None:
    if not cond:
        raise StateError(f"{filename} is malformed: {what}")


def _valid(check: Callable[[Any], Any], value: Any, filename: str, what: str = "") -> Any:
    """check(value), its ValueError turned into a StateError naming the file."""
    try:
        return check(value)
    except ValueError as exc:
        raise StateError(f"{filename} is malformed: {what}{exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checked_key(value: Any, filename: str, what: str) -> str:
    _require(isinstance(value, str), filename, f"{what} is not a string")
    _valid(keys.validate_key, value, filename, f"{what}: ")
    return value


def _parse_peer(item: Any, index: int) -> PeerRecord:
    _require(isinstance(item, dict), PEERS_FILE, f"peer #{index + 1} is not an object")
    name = item.get("name")
    _require(isinstance(name, str), PEERS_FILE, f"peer #{index + 1} has no name")
    _valid(validate_peer_name, name, PEERS_FILE)
    where = f"peer {name!r}"
    try:
        ip = ipaddress.IPv4Address(item.get("ip"))
    except ValueError:
        raise StateError(f"{PEERS_FILE} is malformed: {where} has an invalid ip") from None
    created = item.get("created")
    _require(_is_number(created), PEERS_FILE, f"{where} has an invalid 'created'")
    policy = item.get("policy", "allow")
    _require(policy in PEER_POLICIES, PEERS_FILE, f"{where} has an invalid 'policy'")
    fallback = item.get("fallback", "deny")
    _require(fallback in PEER_FALLBACKS, PEERS_FILE, f"{where} has an invalid 'fallback'")
    return PeerRecord(
        name=name,
        public_key=_checked_key(item.get("public_key"), PEERS_FILE, f"{where} public_key"),
        private_key=_checked_key(item.get("private_key"), PEERS_FILE, f"{where} private_key"),
        preshared_key=_checked_key(item.get("preshared_key"), PEERS_FILE, f"{where} preshared_key"),
        ip=str(ip),
        created=float(created),
        policy=policy,
        fallback=fallback,
    )


def _parse_peers(doc: Any) -> list[PeerRecord]:
    _require(isinstance(doc, dict), PEERS_FILE, "not a JSON object")
    _require(doc.get("version") == PEERS_VERSION, PEERS_FILE, "unsupported version")
    items = doc.get("peers")
    _require(isinstance(items, list), PEERS_FILE, "'peers' is not a list")
    peers = [_parse_peer(item, i) for i, item in enumerate(items)]
    for attr in ("name", "ip", "public_key"):
        values = [getattr(p, attr).lower() if attr == "name" else getattr(p, attr) for p in peers]
        _require(len(set(values)) == len(values), PEERS_FILE, f"duplicate peer {attr}")
    return peers


# How gateway.json's saved settings are checked on reading (endpoint and address: strings).
_SETTING_CHECKS: dict[str, Callable[[Any], Any]] = {
    "listen_port": validate_listen_port,
    "endpoint": str,
    "address": lambda value: str(validate_address(value)),
}


def _parse_gateway(doc: Any) -> tuple[GatewayIdentity, dict[str, Any], float]:
    _require(isinstance(doc, dict), GATEWAY_FILE, "not a JSON object")
    private_key = _checked_key(doc.get("private_key"), GATEWAY_FILE, "private_key")
    public_key = _checked_key(doc.get("public_key"), GATEWAY_FILE, "public_key")
    _require(
        keys.public_from_private(private_key) == public_key,
        GATEWAY_FILE,
        "public_key does not match private_key",
    )
    settings: dict[str, Any] = {}
    for key, check in _SETTING_CHECKS.items():
        if doc.get(key) is not None:
            ok = key == "listen_port" or isinstance(doc[key], str)
            _require(ok, GATEWAY_FILE, f"{key} is not a string")
            settings[key] = _valid(check, doc[key], GATEWAY_FILE)
    created = doc.get("created")
    _require(_is_number(created), GATEWAY_FILE, "invalid 'created'")
    return GatewayIdentity(private_key=private_key, public_key=public_key), settings, created


def _parse_stats(doc: Any) -> dict[str, PeerRuntime]:
    _require(isinstance(doc, dict), STATS_FILE, "not a JSON object")
    out: dict[str, PeerRuntime] = {}
    for public_key, item in doc.items():
        _require(isinstance(item, dict), STATS_FILE, f"entry {public_key!r} is not an object")
        endpoint = item.get("endpoint")
        last_handshake = item.get("last_handshake")
        _require(endpoint is None or isinstance(endpoint, str), STATS_FILE, "bad endpoint")
        _require(
            last_handshake is None or _is_number(last_handshake), STATS_FILE, "bad last_handshake"
        )
        counters = {name: item.get(name, 0) for name in COUNTERS}
        for name, value in counters.items():
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            _require(ok, STATS_FILE, f"bad {name} for {public_key!r}")
        out[public_key] = PeerRuntime(
            endpoint=endpoint,
            last_handshake=None if last_handshake is None else float(last_handshake),
            **counters,
        )
    return out


# --- the directory ----------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Replace path with data, mode 0600: a crash leaves the old file or the new one, never a
    part.  The caller holds the directory's lock (`locked`).  Raises OSError."""
    tmp_path: str | None = None
    try:
        # mkstemp creates the file with mode 0600.
        fd, tmp_path = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        tmp_path = None
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the state dir's write lock (every writer of the dir, CLI or gateway, takes it)."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class StateDir:
    """One gateway's state directory (mode 0700)."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if create:
            self._create()
        self._check()
        if create:
            # Made up front so that a later failing operation leaves the dir exactly as it was.
            self._ensure_lock_file()

    def _create(self) -> None:
        try:
            if self.path.exists():
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.path.mkdir(mode=0o700)
            except FileExistsError:
                return  # another process created it first; _check validates it
        except OSError as exc:
            raise StateError(f"cannot create state dir {self.path}: {exc.strerror}") from None
        # The umask may have narrowed (or oddly widened nothing of) the mode; pin it.
        os.chmod(self.path, 0o700)

    def _check(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise StateError(f"state dir {self.path} does not exist") from None
        except OSError as exc:
            raise StateError(f"cannot access state dir {self.path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"state dir {self.path} is not a directory")
        if st.st_mode & 0o022:
            raise StateError(
                f"state dir {self.path} is group/world-writable; run: chmod 700 {self.path}"
            )
        euid = os.geteuid()
        if euid != 0 and st.st_uid != euid:
            raise StateError(f"state dir {self.path} is owned by another user")
        if not os.access(self.path, os.R_OK | os.W_OK | os.X_OK):
            raise StateError(f"state dir {self.path} is not readable and writable")

    def _ensure_lock_file(self) -> None:
        try:
            os.close(os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StateError(f"cannot create lock file in {self.path}: {exc.strerror}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the dir's write lock around a read-modify-write."""
        try:
            with locked(self.path):
                yield
        except OSError as exc:
            raise StateError(f"cannot lock {self.path}: {exc.strerror}") from None

    def read_json(self, filename: str) -> Any | None:
        """The parsed file, or None if it does not exist."""
        try:
            text = (self.path / filename).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path / filename}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise StateError(f"{filename} is malformed: not UTF-8 text") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateError(f"{filename} is malformed: {exc.msg} at line {exc.lineno}") from None

    def write_json(self, filename: str, doc: Any) -> None:
        """Atomically replace filename with doc (caller holds the lock)."""
        self.write_bytes(filename, (json.dumps(doc, indent=2) + "\n").encode())

    def write_bytes(self, filename: str, data: bytes) -> None:
        """Atomically replace filename with data, already encoded (caller holds the lock)."""
        self._remove_stale_temp_files()
        try:
            write_atomic(self.path / filename, data)
        except OSError as exc:
            raise StateError(f"cannot write {self.path / filename}: {exc.strerror}") from None

    def _remove_stale_temp_files(self) -> None:
        # Writers hold the lock while a temp file exists, so any temp file seen under the lock
        # was left by a writer that was killed.
        with contextlib.suppress(OSError), os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(_TMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def _load_gateway(self) -> tuple[GatewayIdentity, dict[str, Any], float] | None:
        doc = self.read_json(GATEWAY_FILE)
        return None if doc is None else _parse_gateway(doc)

    def identity(self) -> GatewayIdentity:
        """The gateway's key pair; created (once, atomically) on first use."""
        loaded = self._load_gateway()
        if loaded is None:
            self.save_settings()  # creates it under the lock, unless another process did
            loaded = self._load_gateway()
            assert loaded is not None
        return loaded[0]

    def saved_settings(self) -> dict[str, Any]:
        """listen_port / endpoint / address saved earlier; only the ones that are set."""
        loaded = self._load_gateway()
        return {} if loaded is None else dict(loaded[1])

    def save_settings(self, **values: Any) -> None:
        """Save listen_port / endpoint / address (endpoint=None clears it) into gateway.json,
        made with a fresh identity if there is none yet."""
        unknown = set(values) - set(SETTING_KEYS)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        if "listen_port" in values:
            validate_listen_port(values["listen_port"])
        if values.get("endpoint") is not None and not isinstance(values["endpoint"], str):
            raise ValueError("endpoint must be a string or None")
        if "address" in values:
            values["address"] = str(validate_address(str(values["address"])))
        with self.locked():
            loaded = self._load_gateway()
            if loaded is None:
                private_key, public_key = keys.generate_keypair()
                loaded = GatewayIdentity(private_key, public_key), {}, time.time()
            elif not values:
                return
            identity, settings, created = loaded
            if "address" in values:
                self.check_address(ipaddress.IPv4Interface(values["address"]))
            settings.update(values)
            doc = {**asdict(identity), "created": created}
            self.write_json(GATEWAY_FILE, doc | {k: settings.get(k) for k in SETTING_KEYS})

    def check_address(self, address: ipaddress.IPv4Interface) -> None:
        """ValueError if the existing peers' IPs do not fit a (new) gateway address."""
        for peer in self.peers():
            try:
                validate_peer_ip(peer.ip, address.network, address.ip)
            except ValueError as exc:
                raise ValueError(
                    f"address {address} does not suit peer {peer.name!r}: {exc}"
                ) from None

    def peers(self) -> list[PeerRecord]:
        doc = self.read_json(PEERS_FILE)
        return [] if doc is None else _parse_peers(doc)

    def peer(self, name: str) -> PeerRecord:
        for record in self.peers():
            if record.name == name:
                return record
        raise KeyError(f"unknown peer {name!r}")

    def _write_peers(self, peers: list[PeerRecord]) -> None:
        self.write_json(PEERS_FILE, {"version": PEERS_VERSION, "peers": [asdict(p) for p in peers]})

    @staticmethod
    def _choose_ip(
        peers: list[PeerRecord],
        name: str,
        ip: str | None,
        network: ipaddress.IPv4Network,
        gateway_ip: ipaddress.IPv4Address,
    ) -> ipaddress.IPv4Address:
        """Validate a new peer against the existing ones; the IP it would get."""
        validate_peer_name(name)
        requested = None if ip is None else validate_peer_ip(ip, network, gateway_ip)
        # Names differing only in case would confuse people (and case-insensitive file systems).
        if any(p.name.lower() == name.lower() for p in peers):
            raise ValueError(f"a peer named {name!r} already exists")
        if requested is None:
            used = {ipaddress.IPv4Address(p.ip) for p in peers} | {gateway_ip}
            free = next((a for a in network.hosts() if a not in used), None)
            if free is None:
                raise ValueError(f"the tunnel network {network} is full")
            return free
        for p in peers:
            if p.ip == str(requested):
                raise ValueError(f"IP {requested} is already used by peer {p.name!r}")
        return requested

    def check_new_peer(
        self,
        name: str,
        ip: str | None,
        network: ipaddress.IPv4Network,
        gateway_ip: ipaddress.IPv4Address,
    ) -> None:
        """Raise the ValueError add_peer would raise now, without writing anything."""
        self._choose_ip(self.peers(), name, ip, network, gateway_ip)

    def add_peer(
        self,
        name: str,
        ip: str | None,
        network: ipaddress.IPv4Network,
        gateway_ip: ipaddress.IPv4Address,
        *,
        policy: str = "allow",
        fallback: str = "deny",
    ) -> PeerRecord:
        """Add a peer with fresh keys; the record is on disk when this returns.  ValueError (one
        line) for an invalid or duplicate name, an IP outside the net or in use, or a full net.
        With ip=None the lowest free host address is taken (.2 upward when the gateway is .1).
        The policy comes with the peer in one write: no moment sees it with another."""
        validate_peer_policy(policy, fallback)
        with self.locked():
            peers = self.peers()
            chosen = self._choose_ip(peers, name, ip, network, gateway_ip)
            private_key, public_key = keys.generate_keypair()
            record = PeerRecord(
                name=name,
                public_key=public_key,
                private_key=private_key,
                preshared_key=keys.generate_preshared_key(),
                ip=str(chosen),
                created=time.time(),
                policy=policy,
                fallback=fallback,
            )
            self._write_peers([*peers, record])
            return record

    def remove_peer(self, name: str) -> PeerRecord:
        with self.locked():
            peers = self.peers()
            for record in peers:
                if record.name == name:
                    self._write_peers([p for p in peers if p is not record])
                    return record
        raise KeyError(f"unknown peer {name!r}")

    def set_peer_policy(
        self, name: str, policy: str | None = None, fallback: str | None = None
    ) -> PeerRecord:
        """Change a peer's policy and/or fallback (None: unchanged) in peers.json; a running
        gateway reads it within its poll.  KeyError if unknown, ValueError for a bad value
        (nothing written either way); no write if nothing changes."""
        validate_peer_policy(policy, fallback)
        with self.locked():
            peers = self.peers()
            for i, record in enumerate(peers):
                if record.name == name:
                    changed = replace(
                        record,
                        policy=record.policy if policy is None else policy,
                        fallback=record.fallback if fallback is None else fallback,
                    )
                    if changed != record:
                        self._write_peers([*peers[:i], changed, *peers[i + 1 :]])
                    return changed
        raise KeyError(f"unknown peer {name!r}")

    def peers_signature(self) -> tuple[int, int, int]:
        """A cheap change marker of peers.json for polling; (0, 0, 0) if it is missing."""
        try:
            st = os.stat(self.path / PEERS_FILE)
        except OSError:
            return (0, 0, 0)
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def read_stats(self) -> dict[str, PeerRuntime]:
        doc = self.read_json(STATS_FILE)
        return {} if doc is None else _parse_stats(doc)

    def write_stats(self, stats: dict[str, PeerRuntime]) -> None:
        doc = {public_key: asdict(runtime) for public_key, runtime in stats.items()}
        with self.locked():
            self.write_json(STATS_FILE, doc)
