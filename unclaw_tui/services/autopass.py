"""Auto-passthrough, per peer: the hosts for which a peer's client rejected our certificate.

With `--auto-passthrough`, a client that refuses our certificate for a host (a pinning app) has
that peer's later connections to the host passed through untouched.  The list is the peer's
own: one peer cannot switch interception off for another, nor push others' hosts out.  Each
peer keeps at most PER_PEER hosts, least recently rejected first out.

Kept in the state dir as {"version": 2, "peers": {"<public key, base64>": [host, ...]}}.  The
version 1 file was one global list ({"hosts": [...]}); its hosts go to every peer that exists
when it is read, so no client that worked before breaks, and nothing is shared from then on.
Sans-IO: the TLS service reads and writes the file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from unclaw_tui.engine import b64, unb64

PER_PEER = 256
FILE = "auto-passthrough.json"
VERSION = 2


class AutoPassthrough:
    def __init__(self, per_peer: int = PER_PEER) -> None:
        self.per_peer = per_peer
        self._hosts: dict[bytes, OrderedDict[str, None]] = {}
        self.changes = 0  # bumped on every change: the saver writes when it moved

    def has(self, peer_key: bytes, host: str) -> bool:
        hosts = self._hosts.get(peer_key)
        return hosts is not None and host in hosts

    def add(self, peer_key: bytes, host: str) -> None:
        hosts = self._hosts.setdefault(peer_key, OrderedDict())
        hosts[host] = None
        hosts.move_to_end(host)
        while len(hosts) > self.per_peer:
            hosts.popitem(last=False)
        self.changes += 1

    def hosts(self, peer_key: bytes) -> list[str]:
        return list(self._hosts.get(peer_key, ()))

    def to_json(self) -> dict[str, Any]:
        peers = {b64(key): list(hosts) for key, hosts in self._hosts.items() if hosts}
        return {"version": VERSION, "peers": peers}

    def load(self, doc: Any, existing_peers: Iterable[bytes]) -> list[str]:
        """Takes a file's contents (the lists of peers that no longer exist are left out);
        returns what was wrong with it (entries skipped)."""
        existing = set(existing_peers)
        problems: list[str] = []
        if not isinstance(doc, dict):
            return ["not a JSON object"] if doc is not None else []
        if "hosts" in doc and "peers" not in doc:  # version 1: one global list
            legacy = [h for h in doc["hosts"] if _host(h)] if isinstance(doc["hosts"], list) else []
            for key in existing:
                for host in legacy:
                    self.add(key, host)
            return problems
        peers = doc.get("peers")
        if not isinstance(peers, dict):
            return ['"peers" is not an object']
        for text, hosts in peers.items():
            try:
                key = unb64(text)
            except ValueError:
                problems.append(f"not a public key: {text[:60]!r}")
                continue
            if len(key) != 32 or not isinstance(hosts, list):
                problems.append(f"bad entry for {text[:60]!r}")
                continue
            if key not in existing:
                continue
            for host in hosts:
                if _host(host):
                    self.add(key, host)
                else:
                    problems.append(f"not a hostname: {str(host)[:60]!r}")
        return problems


def _host(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 253
