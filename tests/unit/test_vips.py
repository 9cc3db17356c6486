"""The hostname <-> VIP allocator: its rules against a history of what was answered to whom
(random operations), per-peer grants, shares, the no-recycle window, bounded work per call,
random order, and persistence (version 2, and version 1 migrated)."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unclaw_tui.engine.outcomes import Refusal
from unclaw_tui.services import vips as vip_store
from unclaw_tui.services.vips import (
    SWEEP_BATCH,
    TIMES_LAG,
    NoVip,
    VipAllocator,
    normalize_hostname,
    usable,
)
from unclaw_tui.state import StateDir

TINY = ipaddress.IPv4Network("10.78.0.0/29")  # usable: .1 .. .6
TINY_POOL = [f"10.78.0.{i}" for i in range(1, 7)]
PEERS = [bytes([i]) * 32 for i in range(3)]
A, B, C = PEERS
WINDOW = 100.0


def never(ip: str) -> bool:
    return False


def always(ip: str) -> bool:
    return True


def vip(result: str | NoVip) -> str:
    assert isinstance(result, str), result
    return result


# --- the rules, checked against the history of answers ----------------------------------------

op = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 9), st.integers(0, 2), st.integers(0, 60)),
    st.tuples(st.just("flow"), st.integers(0, 5), st.integers(0, 0), st.integers(0, 0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=80), st.integers(1, 4), st.randoms(use_true_random=False))
def test_allocator_keeps_its_rules(
    ops: list[tuple[str, int, int, int]], share: int, rnd: random.Random
) -> None:
    alloc = VipAllocator(TINY, window=WINDOW, peer_share=share, randbelow=rnd.randrange)
    busy: set[str] = set()  # changed in place, so in_use always sees the current set
    answered: dict[tuple[str, bytes], tuple[str, float]] = {}  # (vip, peer) -> (host, when)
    last_answer: dict[str, float] = {}  # vip -> last answer to anyone
    host_of: dict[str, str] = {}  # vip -> the hostname it was last answered for
    now = 1000.0
    for kind, arg, who, dt in ops:
        now += dt
        if kind == "flow":  # opens (only to a VIP some peer was given) or closes a flow
            ip = TINY_POOL[arg]
            if ip in busy:
                busy.discard(ip)
            elif any(alloc.hostname_for(ip, p) is not None for p in PEERS):
                busy.add(ip)
            continue
        host, peer = f"h{arg}.example", PEERS[who]
        live = {h for (ip, p), (h, t) in answered.items() if p == peer and now - t < WINDOW}
        got = alloc.allocate(host, now, busy.__contains__, peer=peer)
        if isinstance(got, NoVip):
            if got.why.startswith(Refusal.SHARE.value):
                # Refused for the share only with `share` other names answered it in the window.
                assert host not in live and len(live) >= share
            else:
                assert got.why == "VIP pool exhausted"
                assert len(alloc) == len(TINY_POOL)  # every address is mapped
            continue
        assert ipaddress.IPv4Address(got) in TINY and got in TINY_POOL
        previous = host_of.get(got)
        if previous is not None and previous != host:
            # Recycled: never within the window of its last answer, nor under an open flow.
            assert now - last_answer[got] >= WINDOW and got not in busy
        if host in live:  # a name the peer holds keeps its VIP
            assert answered[(got, peer)][0] == host
        answered[(got, peer)] = (host, now)
        last_answer[got] = now
        host_of[got] = host
        assert len(live | {host}) <= share
        # What every peer may see: the hosts it was answered, never another peer's.
        for ip in TINY_POOL:
            for p in PEERS:
                seen = alloc.hostname_for(ip, p)
                mine = answered.get((ip, p))
                if mine is not None and now - mine[1] < WINDOW and host_of[ip] == mine[0]:
                    assert seen == mine[0]
                else:
                    assert seen is None or (mine is not None and seen == mine[0])
    # The persisted form carries the same map and grants into a new run.
    again = VipAllocator(TINY, window=WINDOW, peer_share=share)
    assert again.load_json(json.loads(json.dumps(alloc.to_json()))) == 0
    for ip in TINY_POOL:
        for p in PEERS:
            assert again.hostname_for(ip, p) == alloc.hostname_for(ip, p)


# --- one peer's lookups are its own -----------------------------------------------------------


def test_a_vip_is_given_to_the_peers_that_asked_only() -> None:
    # Fails before: the map had no peers; hostname_for(ip) named the host for anyone.
    alloc = VipAllocator(randbelow=lambda n: 0)
    mine = vip(alloc.allocate("example.test", 10.0, never, peer=A))
    assert alloc.hostname_for(mine, A) == "example.test"
    assert alloc.hostname_for(mine, B) is None
    assert alloc.hostname_for("10.78.200.200", A) is None  # nobody's
    assert alloc.hostname_for("not an address", A) is None
    # B asks the same name: the same VIP, given to B too; it costs B a grant, not an address.
    assert alloc.allocate("example.test", 11.0, never, peer=B) == mine
    assert alloc.hostname_for(mine, B) == "example.test"
    assert (len(alloc), alloc.held_by(A), alloc.held_by(B)) == (1, 1, 1)


def test_vips_come_in_no_guessable_order() -> None:
    # Fails before: the lowest free address, so the next name's VIP was the last one plus one.
    alloc = VipAllocator()
    got = [
        int(ipaddress.IPv4Address(vip(alloc.allocate(f"h{i}.test", 0.0, never, peer=A))))
        for i in range(200)
    ]
    steps = {b - a for a, b in itertools.pairwise(got)}
    assert len(steps) > 100  # not a stride, not a counter
    assert max(got) - min(got) > 30_000  # spread over the pool
    assert all(usable(ip, alloc.network) for ip in got) and len(set(got)) == 200


def test_the_pool_is_every_usable_address() -> None:
    net = ipaddress.IPv4Network("10.78.0.0/22")
    alloc = VipAllocator(net, peer_share=10_000)
    got = [alloc.allocate(f"h{i}", 0.0, always, peer=A) for i in range(4 * 254)]
    assert len({vip(g) for g in got}) == 4 * 254
    assert all(not str(g).endswith((".0", ".255")) for g in got)
    # Exhausted, all answered just now: no VIP rather than one a client may still hold.
    assert alloc.allocate("one-more", 100.0, never, peer=A) == NoVip("VIP pool exhausted")
    assert not usable(int(net.network_address), net)
    assert not usable(int(net.broadcast_address), net)
    with pytest.raises(ValueError):
        VipAllocator("10.0.0.0/7")
    # Reloaded with some mapped and some freed again: the rest of the pool, each address once.
    some = VipAllocator(net, window=WINDOW, peer_share=10_000)
    kept = {vip(some.allocate(f"k{i}", 0.0, never, peer=A)) for i in range(300)}
    for i in range(200):
        vip(some.allocate(f"k{i}", 60.0, never, peer=A))  # the first 200 renewed
    vip(some.allocate("sweep", 150.0, never, peer=A))  # the other 100 freed by now
    assert some.free == 4 * 254 - 201
    again = VipAllocator(net, window=WINDOW, peer_share=10_000)
    again.load_json(json.loads(json.dumps(some.to_json())))
    mapped = {str(again.vip_for(f"k{i}")) for i in range(200)} | {str(again.vip_for("sweep"))}
    assert mapped <= kept | {str(some.vip_for("sweep"))} and again.free == 4 * 254 - 201
    rest = [vip(again.allocate(f"r{i}", 150.0, never, peer=B)) for i in range(again.free)]
    assert len(set(rest)) == len(rest) and not set(rest) & mapped
    assert isinstance(again.allocate("full", 150.0, never, peer=B), NoVip)


# --- the pool cannot be exhausted or recycled under another peer ------------------------------


def test_each_peer_has_a_share_of_the_pool() -> None:
    # Fails before: one peer's wildcard names took every address.
    alloc = VipAllocator(TINY, window=WINDOW, peer_share=2)
    a1 = vip(alloc.allocate("1.wild.test", 0.0, never, peer=A))
    vip(alloc.allocate("2.wild.test", 1.0, never, peer=A))
    refused = alloc.allocate("3.wild.test", 2.0, never, peer=A)
    assert refused == NoVip(Refusal.SHARE.says(f"2 VIPs answered within {WINDOW / 3600:g} h"))
    assert alloc.allocate("1.wild.test", 3.0, never, peer=A) == a1  # its own names still answer
    assert isinstance(alloc.allocate("other.test", 4.0, never, peer=B), str)  # B unaffected
    assert alloc.free == 3
    # A grant lasts a window after its last answer: 2.wild's (at 1.0) goes first.
    assert isinstance(alloc.allocate("3.wild.test", 0.0 + WINDOW, never, peer=A), NoVip)
    vip(alloc.allocate("3.wild.test", 1.0 + WINDOW, never, peer=A))
    assert alloc.hostname_for(a1, A) == "1.wild.test"  # renewed at 3.0: still A's


def test_no_vip_is_recycled_within_the_window_of_its_last_answer() -> None:
    # Fails before: once the pool was full, a VIP idle for 30 s went to a new name, while a
    # client (of any peer) could still hold the old answer.
    alloc = VipAllocator(TINY, window=WINDOW, peer_share=10)
    first = {vip(alloc.allocate(f"h{i}", float(i), never, peer=A)): f"h{i}" for i in range(6)}
    assert alloc.allocate("new", 60.0, never, peer=B) == NoVip("VIP pool exhausted")
    h0 = alloc.vip_for("h0")
    assert alloc.allocate("h0", 90.0, never, peer=C) == h0  # h0 answered again, to C
    # At 103 every VIP but h0's (answered at 90) and h4's, h5's is a window old; h1's has a flow.
    h1 = alloc.vip_for("h1")
    got = vip(alloc.allocate("new", 103.0, lambda ip: ip == h1, peer=B))
    assert first[got] in ("h2", "h3")
    assert alloc.hostname_for(got, B) == "new" and alloc.hostname_for(got, A) is None
    assert alloc.vip_for("h0") == h0 and alloc.vip_for("h1") == h1
    assert alloc.hostname_for(h0, C) == "h0"
    # A name asked again before its VIP was recycled keeps it, whoever asks.
    h5 = alloc.vip_for("h5")
    assert alloc.allocate("h5", 104.0, never, peer=B) == h5


def test_allocation_cost_does_not_grow_with_the_pool() -> None:
    # Fails before: a full pool was scanned (in_use asked for every VIP) for each new name.
    alloc = VipAllocator(window=WINDOW, peer_share=1 << 20)
    pool = alloc.free
    assert pool == 65_024
    for i in range(pool):
        vip(alloc.allocate(f"{i}.wild.test", 0.0, never, peer=A))
    asked = 0

    def in_use(ip: str) -> bool:
        nonlocal asked
        asked += 1
        return True

    # Full, every answer within the window: refused without looking at a single VIP.
    assert alloc.allocate("x.wild.test", 50.0, in_use, peer=B) == NoVip("VIP pool exhausted")
    assert asked == 0
    # Past the window with every VIP in use: each call looks at SWEEP_BATCH of them at most.
    assert isinstance(alloc.allocate("x.wild.test", 200.0, in_use, peer=B), NoVip)
    assert asked <= SWEEP_BATCH
    # Past the window, nothing in use: the next name gets a VIP at once, as do the ones after.
    asked = 0
    for i in range(10):
        vip(alloc.allocate(f"y{i}.wild.test", 400.0 + i, never, peer=B))


# --- persistence ------------------------------------------------------------------------------


def test_persistence_keeps_grants_atomic_0600(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    alloc = VipAllocator()
    one = vip(alloc.allocate("example.test", 5.0, never, peer=A))
    two = vip(alloc.allocate("www.example.test", 6.0, never, peer=B))
    vip(alloc.allocate("example.test", 7.0, never, peer=B))
    assert vip_store.save(state, alloc.snapshot())
    path = tmp_path / "state" / vip_store.VIPS_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and len(doc["peers"]) == 2
    loaded = VipAllocator()
    vip_store.load(state, loaded)
    assert loaded.vip_for("example.test") == one
    assert loaded.hostname_for(one, A) == "example.test"
    assert loaded.hostname_for(one, B) == "example.test"
    assert loaded.hostname_for(two, B) == "www.example.test"
    assert loaded.hostname_for(two, A) is None  # restarts keep who may use what
    assert loaded._grants[(int(ipaddress.IPv4Address(one)), A)] == 5.0 + TIMES_LAG
    new = vip(loaded.allocate("new.test", 8.0, never, peer=A))
    assert new not in (one, two)


def test_encode_in_slices_is_the_document(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vip_store, "ENCODE_SLICE", 7)
    alloc = VipAllocator()
    for i in range(30):
        vip(alloc.allocate(f"h{i}.test", float(i), never, peer=PEERS[i % 3]))
    snap = alloc.snapshot()
    assert json.loads(vip_store.encode(snap)) == vip_store.document(snap)
    empty = VipAllocator().snapshot()
    assert json.loads(vip_store.encode(empty)) == vip_store.document(empty)


def test_a_version_1_map_is_kept_but_given_to_no_peer(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    doc = {
        "version": 1,
        "network": "10.78.0.0/16",
        "vips": [
            {"hostname": "old.test", "ip": "10.78.0.1", "last_used": 1000.0},
            {"hostname": "older.test", "ip": "10.78.0.2", "last_used": 10.0},
        ],
    }
    (tmp_path / "state" / vip_store.VIPS_FILE).write_text(json.dumps(doc))
    alloc = VipAllocator(window=WINDOW)
    vip_store.load(state, alloc)
    assert alloc.vip_for("old.test") == "10.78.0.1"
    assert all(alloc.hostname_for("10.78.0.1", p) is None for p in PEERS)
    # Asked again: the same VIP, given to the asker only.
    assert alloc.allocate("old.test", 1001.0, never, peer=A) == "10.78.0.1"
    assert alloc.hostname_for("10.78.0.1", A) == "old.test"
    assert alloc.hostname_for("10.78.0.1", B) is None
    # Not asked again: recycled once a window has passed since its last answer (and the lag).
    assert alloc.vip_for("older.test") is None  # 10 + 100 + 61 < 1001: already swept
    assert alloc.free == 65_023


def test_load_skips_bad_entries_and_survives_a_damaged_file(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    doc = {
        "version": 2,
        "network": "10.78.0.0/16",
        "peers": ["AAAA", "not base64!"],
        "vips": [
            {"hostname": "ok.test", "ip": "10.78.0.9", "last_used": 1.0, "given": [[0, 1.0]]},
            {"hostname": "badgrants.test", "ip": "10.78.0.12", "last_used": 1.0,
             "given": [[1, 1.0], [5, 1.0], ["0", 1.0], [0], [0, "x"], [True, 1.0]]},
            {"hostname": "outside.test", "ip": "10.79.0.1", "last_used": 1.0},
            {"hostname": "dot255.test", "ip": "10.78.0.255", "last_used": 1.0},
            {"hostname": "UPPER.test", "ip": "10.78.0.10", "last_used": 1.0},
            {"hostname": "dup.test", "ip": "10.78.0.9", "last_used": 1.0},
            {"hostname": "nolast.test", "ip": "10.78.0.11"},
            {"hostname": "given.test", "ip": "10.78.0.13", "last_used": 1.0, "given": {}},
            "junk",
        ],
    }  # fmt: skip
    alloc = VipAllocator()
    assert alloc.load_json(doc) == 7
    assert len(alloc) == 2 and alloc.vip_for("ok.test") == "10.78.0.9"
    assert alloc.hostname_for("10.78.0.9", b"\x00\x00\x00") == "ok.test"
    assert alloc.vip_for("badgrants.test") == "10.78.0.12"  # kept, given to no peer
    assert all(alloc.hostname_for("10.78.0.12", p) is None for p in PEERS)
    (tmp_path / "state" / vip_store.VIPS_FILE).write_text("{not json")
    damaged = VipAllocator()
    vip_store.load(state, damaged)  # logged, not raised: the gateway still starts
    assert len(damaged) == 0
    with pytest.raises(ValueError):
        VipAllocator().load_json({"version": 99})
    with pytest.raises(ValueError):
        VipAllocator().load_json({"version": 2, "vips": [], "peers": "x"})


def test_snapshot_is_a_copy() -> None:
    alloc = VipAllocator()
    vip(alloc.allocate("a.test", 1.0, never, peer=A))
    snap = alloc.snapshot()
    vip(alloc.allocate("b.test", 2.0, never, peer=A))
    vip(alloc.allocate("a.test", 3.0, never, peer=A))
    assert list(snap.hosts.values()) == ["a.test"] and list(snap.grants.values()) == [1.0]


def test_normalize_hostname() -> None:
    assert normalize_hostname("ExAmple.TEST.") == "example.test"
