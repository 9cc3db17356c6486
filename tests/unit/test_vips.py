"""The hostname <-> VIP allocator: against a slow reference, its pool, LRU reuse, persistence."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unclaw_tui.services import vips as vip_store
from unclaw_tui.services.vips import VipAllocator, normalize_hostname, usable
from unclaw_tui.state import StateDir

TINY = ipaddress.IPv4Network("10.78.0.0/29")  # usable: .1 .. .6


class SlowVips:
    """The rules in their plainest form: lowest free usable address; once none is free, the
    mapping touched longest ago that is idle long enough and has no open flow."""

    def __init__(self, network: ipaddress.IPv4Network, min_idle: float) -> None:
        self.pool = [
            str(ip)
            for ip in network
            if ip not in (network.network_address, network.broadcast_address)
            and int(ip) & 0xFF not in (0, 255)
        ]
        self.min_idle = min_idle
        self.ip_of: dict[str, str] = {}
        self.last: dict[str, float] = {}
        self.seq: dict[str, int] = {}
        self.counter = 0

    def _touch(self, host: str, now: float) -> None:
        self.last[host] = max(self.last.get(host, now), now)
        self.counter += 1
        self.seq[host] = self.counter

    def allocate(self, host: str, now: float, busy: set[str]) -> str | None:
        if host not in self.ip_of:
            free = [ip for ip in self.pool if ip not in self.ip_of.values()]
            if free:
                ip = free[0]
            else:
                candidates = [
                    h
                    for h, ip in self.ip_of.items()
                    if now - self.last[h] >= self.min_idle and ip not in busy
                ]
                if not candidates:
                    return None
                victim = min(candidates, key=lambda h: self.seq[h])
                ip = self.ip_of.pop(victim)
                del self.last[victim], self.seq[victim]
            self.ip_of[host] = ip
        self._touch(host, now)
        return self.ip_of[host]

    def touch_ip(self, ip: str, now: float) -> None:
        for host, mine in self.ip_of.items():
            if mine == ip:
                self._touch(host, now)

    def hostname_for(self, ip: str) -> str | None:
        return next((h for h, mine in self.ip_of.items() if mine == ip), None)


op = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 11), st.integers(0, 15)),
    st.tuples(st.just("touch"), st.integers(1, 6), st.integers(0, 15)),
    st.tuples(st.just("flow"), st.integers(1, 6), st.integers(0, 0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=80), st.sampled_from([0.0, 10.0]))
def test_allocator_matches_slow_reference(ops: list[tuple[str, int, int]], min_idle: float) -> None:
    fast = VipAllocator(TINY, min_idle=min_idle)
    slow = SlowVips(TINY, min_idle)
    busy: set[str] = set()  # changed in place, so in_use always sees the current set
    in_use = busy.__contains__
    now = 1000.0
    for kind, arg, dt in ops:
        now += dt
        if kind == "alloc":
            host = f"h{arg}.example"
            assert fast.allocate(host, now, in_use) == slow.allocate(host, now, busy)
        elif kind == "touch":
            ip = f"10.78.0.{arg}"
            fast.touch(ip, now)
            slow.touch_ip(ip, now)
        else:
            busy ^= {f"10.78.0.{arg}"}
        for i in range(1, 7):
            ip = f"10.78.0.{i}"
            assert fast.hostname_for(ip) == slow.hostname_for(ip)
        for host, ip in slow.ip_of.items():
            assert fast.vip_for(host) == ip
    # The persisted form carries the same behaviour into a new run.
    again = VipAllocator(TINY, min_idle=min_idle)
    assert again.load_json(json.loads(json.dumps(fast.to_json()))) == 0
    for i in range(12):
        now += 7
        host = f"n{i}.example"
        assert again.allocate(host, now, in_use) == slow.allocate(host, now, busy)


def test_pool_skips_network_broadcast_and_dot_zero_and_255() -> None:
    net = ipaddress.IPv4Network("10.78.0.0/22")
    alloc = VipAllocator(net)
    got = [alloc.allocate(f"h{i}", 0.0, lambda ip: True) for i in range(4 * 254)]
    assert None not in got
    assert len(set(got)) == 4 * 254
    assert got[0] == "10.78.0.1" and got[254] == "10.78.1.1" and got[-1] == "10.78.3.254"
    assert all(not ip.endswith((".0", ".255")) for ip in got if ip is not None)
    # Exhausted, every VIP busy: no answer rather than a VIP someone is using.
    assert alloc.allocate("one-more", 100.0, lambda ip: True) is None
    assert not usable(int(net.network_address), net)
    assert not usable(int(net.broadcast_address), net)


def test_lru_reuse_respects_open_flows_and_recent_answers() -> None:
    alloc = VipAllocator(TINY, min_idle=30)
    for i in range(6):
        assert alloc.allocate(f"h{i}", 100.0 + i, lambda ip: False) == f"10.78.0.{i + 1}"
    # Everything was answered within the last 30 s: a client may still hold those answers.
    assert alloc.allocate("new", 120.0, lambda ip: False) is None
    alloc.touch("10.78.0.1", 150.0)  # h0 used again: h1 is now the least recently used
    busy = {"10.78.0.2"}  # ...but h1 has an open flow, so h2 goes
    assert alloc.allocate("new", 200.0, lambda ip: ip in busy) == "10.78.0.3"
    assert alloc.hostname_for("10.78.0.3") == "new"
    assert alloc.vip_for("h2") is None
    assert alloc.vip_for("h1") == "10.78.0.2"
    # A known name keeps its VIP, whatever the pool's state.
    assert alloc.allocate("h1", 201.0, lambda ip: True) == "10.78.0.2"


def test_normalize_hostname() -> None:
    assert normalize_hostname("ExAmple.TEST.") == "example.test"


def test_persistence_round_trip_atomic_0600(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    alloc = VipAllocator()
    assert alloc.allocate("example.test", 5.0, lambda ip: False) == "10.78.0.1"
    assert alloc.allocate("www.example.test", 6.0, lambda ip: False) == "10.78.0.2"
    vip_store.save(state, alloc.to_json())
    path = tmp_path / "state" / vip_store.VIPS_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = VipAllocator()
    vip_store.load(state, loaded)
    assert loaded.vip_for("example.test") == "10.78.0.1"
    assert loaded.hostname_for("10.78.0.2") == "www.example.test"
    # The next new name gets the next address, not one already given out.
    assert loaded.allocate("new.test", 7.0, lambda ip: False) == "10.78.0.3"


def test_load_skips_bad_entries_and_survives_a_damaged_file(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    doc = {
        "version": 1,
        "network": "10.78.0.0/16",
        "vips": [
            {"hostname": "ok.test", "ip": "10.78.0.9", "last_used": 1.0},
            {"hostname": "outside.test", "ip": "10.79.0.1", "last_used": 1.0},
            {"hostname": "dot255.test", "ip": "10.78.0.255", "last_used": 1.0},
            {"hostname": "UPPER.test", "ip": "10.78.0.10", "last_used": 1.0},
            {"hostname": "dup.test", "ip": "10.78.0.9", "last_used": 1.0},
            {"hostname": "nolast.test", "ip": "10.78.0.11"},
            "junk",
        ],
    }
    alloc = VipAllocator()
    assert alloc.load_json(doc) == 6
    assert len(alloc) == 1 and alloc.vip_for("ok.test") == "10.78.0.9"
    (tmp_path / "state" / vip_store.VIPS_FILE).write_text("{not json")
    damaged = VipAllocator()
    vip_store.load(state, damaged)  # logged, not raised: the gateway still starts
    assert len(damaged) == 0
    with pytest.raises(ValueError):
        VipAllocator().load_json({"version": 99})
