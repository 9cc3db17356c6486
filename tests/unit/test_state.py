"""State dir: identity, peers, settings and stats on disk; validation before any write."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat
import threading
from pathlib import Path

import nacl.public
import pytest

from unclaw_tui import keys
from unclaw_tui.state import (
    GatewayIdentity,
    PeerRecord,
    PeerRuntime,
    StateDir,
    StateError,
)

NET = ipaddress.IPv4Network("10.77.0.0/24")
GW = ipaddress.IPv4Address("10.77.0.1")


def snapshot(path: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file's bytes, mtime and mode: compared before/after to prove nothing was written."""
    out = {}
    for entry in sorted(path.iterdir()):
        st = entry.stat()
        out[entry.name] = (entry.read_bytes(), st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "state")


# --- directory ---------------------------------------------------------------------------------


def test_creates_dir_with_mode_0700_and_parents(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        sd = StateDir(tmp_path / "a" / "b" / "state")
    finally:
        os.umask(old_umask)
    assert sd.path.is_dir()
    assert stat.S_IMODE(sd.path.stat().st_mode) == 0o700


def test_existing_dir_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    assert StateDir(path).path == path


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_refuses_group_or_world_writable_dir(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "state"
    path.mkdir()
    os.chmod(path, mode)
    with pytest.raises(StateError, match="group/world-writable"):
        StateDir(path)
    assert list(path.iterdir()) == []


def test_refuses_a_file_as_state_dir(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("x")
    with pytest.raises(StateError, match="not a directory"):
        StateDir(path)


def test_cannot_create_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="cannot create state dir"):
        StateDir(tmp_path / "file" / "state")


def test_create_false_does_not_create(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="does not exist"):
        StateDir(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


# --- identity ----------------------------------------------------------------------------------


def test_identity_is_created_once_and_persisted(state: StateDir) -> None:
    first = state.identity()
    assert isinstance(first, GatewayIdentity)
    again = StateDir(state.path).identity()
    assert again == first
    raw_private = base64.b64decode(first.private_key)
    expected_public = bytes(nacl.public.PrivateKey(raw_private).public_key)
    assert base64.b64decode(first.public_key) == expected_public
    doc = json.loads((state.path / "gateway.json").read_text())
    assert doc["private_key"] == first.private_key
    assert doc["public_key"] == first.public_key
    assert isinstance(doc["created"], float)
    assert doc["endpoint"] is None
    assert stat.S_IMODE((state.path / "gateway.json").stat().st_mode) == 0o600


def test_identity_race_creates_a_single_key(tmp_path: Path) -> None:
    path = tmp_path / "state"
    StateDir(path)
    results: list[GatewayIdentity] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        sd = StateDir(path)
        barrier.wait()
        results.append(sd.identity())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert len({r.public_key for r in results}) == 1
    assert StateDir(path).identity() == results[0]


def test_repr_hides_secrets(state: StateDir) -> None:
    identity = state.identity()
    peer = state.add_peer("phone", None, NET, GW)
    assert identity.private_key not in repr(identity)
    assert identity.public_key in repr(identity)
    assert peer.private_key not in repr(peer)
    assert peer.preshared_key not in repr(peer)
    assert "phone" in repr(peer)


# --- settings ----------------------------------------------------------------------------------


def test_settings_roundtrip_keeps_identity(state: StateDir) -> None:
    identity = state.identity()
    assert state.saved_settings() == {}
    state.save_settings(listen_port=51999, endpoint="vpn.example.com")
    state.save_settings(address="10.77.0.1/24")
    assert state.saved_settings() == {
        "listen_port": 51999,
        "endpoint": "vpn.example.com",
        "address": "10.77.0.1/24",
    }
    assert StateDir(state.path).identity() == identity
    state.save_settings(endpoint=None)
    assert "endpoint" not in state.saved_settings()


def test_save_settings_creates_identity_when_missing(state: StateDir) -> None:
    state.save_settings(listen_port=4000)
    assert state.saved_settings() == {"listen_port": 4000}
    assert (
        state.identity().public_key
        == json.loads((state.path / "gateway.json").read_text())["public_key"]
    )


@pytest.mark.parametrize(
    "values",
    [
        {"listen_port": 0},
        {"listen_port": 70000},
        {"address": "10.77.0.1"},
        {"address": "10.77.0.0/24"},
        {"address": "10.77.0.1/31"},
        {"colour": "blue"},
    ],
)
def test_bad_settings_write_nothing(state: StateDir, values: dict[str, object]) -> None:
    state.identity()
    before = snapshot(state.path)
    with pytest.raises(ValueError):
        state.save_settings(**values)
    assert snapshot(state.path) == before


def test_address_must_fit_existing_peers(state: StateDir) -> None:
    state.add_peer("phone", "10.77.0.5", NET, GW)
    state.identity()
    before = snapshot(state.path)
    with pytest.raises(ValueError, match="phone"):
        state.save_settings(address="10.99.0.1/24")
    with pytest.raises(ValueError, match="gateway's own address"):
        state.save_settings(address="10.77.0.5/24")
    assert snapshot(state.path) == before
    state.save_settings(address="10.77.0.1/16")
    assert state.saved_settings()["address"] == "10.77.0.1/16"


# --- peers -------------------------------------------------------------------------------------


def test_add_peer_assigns_lowest_free_ip_and_persists(state: StateDir) -> None:
    a = state.add_peer("a", None, NET, GW)
    b = state.add_peer("b", None, NET, GW)
    c = state.add_peer("c", "10.77.0.10", NET, GW)
    assert (a.ip, b.ip, c.ip) == ("10.77.0.2", "10.77.0.3", "10.77.0.10")
    state.remove_peer("a")
    d = state.add_peer("d", None, NET, GW)
    assert d.ip == "10.77.0.2"
    reloaded = StateDir(state.path).peers()
    assert [p.name for p in reloaded] == ["b", "c", "d"]
    assert reloaded == [b, c, d]
    assert stat.S_IMODE((state.path / "peers.json").stat().st_mode) == 0o600
    doc = json.loads((state.path / "peers.json").read_text())
    assert doc["version"] == 1
    assert set(doc["peers"][0]) == {
        "name",
        "public_key",
        "private_key",
        "preshared_key",
        "ip",
        "created",
        "policy",
        "fallback",
    }
    assert (doc["peers"][0]["policy"], doc["peers"][0]["fallback"]) == ("allow", "deny")


def test_auto_ip_skips_gateway_wherever_it_is(state: StateDir) -> None:
    net = ipaddress.IPv4Network("10.5.0.0/29")
    gw = ipaddress.IPv4Address("10.5.0.2")
    ips = [state.add_peer(f"p{i}", None, net, gw).ip for i in range(5)]
    assert ips == ["10.5.0.1", "10.5.0.3", "10.5.0.4", "10.5.0.5", "10.5.0.6"]


def test_peer_keys_are_valid_and_distinct(state: StateDir) -> None:
    peers = [state.add_peer(f"p{i}", None, NET, GW) for i in range(5)]
    for p in peers:
        assert keys.public_from_private(p.private_key) == p.public_key
        assert len(keys.validate_key(p.preshared_key)) == 32
    assert len({p.public_key for p in peers}) == 5
    assert len({p.preshared_key for p in peers}) == 5


def test_peer_lookup(state: StateDir) -> None:
    added = state.add_peer("phone", None, NET, GW)
    assert state.peer("phone") == added
    with pytest.raises(KeyError, match="unknown peer 'laptop'"):
        state.peer("laptop")


@pytest.mark.parametrize(
    ("name", "ip", "reason"),
    [
        ("bad name", None, "invalid peer name"),
        ("-dash", None, "invalid peer name"),
        (".dot", None, "invalid peer name"),
        ("x" * 33, None, "invalid peer name"),
        ("", None, "invalid peer name"),
        ("naïve", None, "invalid peer name"),
        ("phone", None, "already exists"),
        ("PHONE", None, "already exists"),
        ("new", "10.78.0.5", "not in the tunnel network"),
        ("new", "10.77.0.0", "network address"),
        ("new", "10.77.0.255", "broadcast address"),
        ("new", "10.77.0.1", "gateway's own address"),
        ("new", "10.77.0.2", "already used by peer 'phone'"),
        ("new", "10.77.0", "invalid IP"),
    ],
)
def test_add_peer_errors_write_nothing(
    state: StateDir, name: str, ip: str | None, reason: str
) -> None:
    state.add_peer("phone", None, NET, GW)
    before = snapshot(state.path)
    with pytest.raises(ValueError, match=reason):
        state.add_peer(name, ip, NET, GW)
    with pytest.raises(ValueError, match=reason):
        state.check_new_peer(name, ip, NET, GW)
    assert snapshot(state.path) == before


def test_valid_names(state: StateDir) -> None:
    for name in ["a", "A1", "my-phone_2.home", "9" * 32]:
        assert state.add_peer(name, None, NET, GW).name == name


def test_full_network(state: StateDir) -> None:
    net = ipaddress.IPv4Network("10.77.0.0/30")
    assert state.add_peer("only", None, net, GW).ip == "10.77.0.2"
    before = snapshot(state.path)
    with pytest.raises(ValueError, match="is full"):
        state.add_peer("more", None, net, GW)
    assert snapshot(state.path) == before


def test_remove_unknown_peer_writes_nothing(state: StateDir) -> None:
    state.add_peer("phone", None, NET, GW)
    before = snapshot(state.path)
    with pytest.raises(KeyError, match="unknown peer 'ghost'"):
        state.remove_peer("ghost")
    assert snapshot(state.path) == before


def test_peers_signature_changes_on_every_write(state: StateDir) -> None:
    assert state.peers_signature() == (0, 0, 0)
    seen = {state.peers_signature()}
    for i in range(3):
        state.add_peer(f"p{i}", None, NET, GW)
        seen.add(state.peers_signature())
    state.remove_peer("p1")
    seen.add(state.peers_signature())
    assert len(seen) == 5


def test_concurrent_adds_from_threads(tmp_path: Path) -> None:
    path = tmp_path / "state"
    StateDir(path)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            sd = StateDir(path)
            for j in range(5):
                sd.add_peer(f"t{i}-{j}", None, NET, GW)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    peers = StateDir(path).peers()
    assert len(peers) == 30
    assert len({p.ip for p in peers}) == 30


# --- atomic writes -----------------------------------------------------------------------------


def test_failed_replace_keeps_old_file_and_no_temp(
    state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    state.add_peer("phone", None, NET, GW)
    before = (state.path / "peers.json").read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StateError, match="cannot write"):
        state.add_peer("laptop", None, NET, GW)
    monkeypatch.undo()
    assert (state.path / "peers.json").read_bytes() == before
    assert sorted(p.name for p in state.path.iterdir()) == [".lock", "peers.json"]


def test_stale_temp_files_are_cleaned_on_next_write(state: StateDir) -> None:
    stale = state.path / ".peers.json.abc123.tmp"
    stale.write_text('{"version": 1, "pe')
    state.add_peer("phone", None, NET, GW)
    assert not stale.exists()
    assert [p.name for p in state.peers()] == ["phone"]


# --- malformed files ---------------------------------------------------------------------------


def _valid_peer_doc() -> dict[str, object]:
    private_key, public_key = keys.generate_keypair()
    return {
        "name": "phone",
        "public_key": public_key,
        "private_key": private_key,
        "preshared_key": keys.generate_preshared_key(),
        "ip": "10.77.0.2",
        "created": 1.0,
    }


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[]",
        '{"version": 2, "peers": []}',
        '{"version": 1, "peers": {}}',
        '{"version": 1, "peers": [1]}',
        "BADKEY",
        "BADIP",
        "BADNAME",
        "DUPLICATE",
        b"\xff\xfe",
    ],
)
def test_malformed_peers_file(state: StateDir, content: str | bytes) -> None:
    peer = _valid_peer_doc()
    if content == "BADKEY":
        content = json.dumps({"version": 1, "peers": [{**peer, "private_key": "abc"}]})
    elif content == "BADIP":
        content = json.dumps({"version": 1, "peers": [{**peer, "ip": "10.77.0.300"}]})
    elif content == "BADNAME":
        content = json.dumps({"version": 1, "peers": [{**peer, "name": "a b"}]})
    elif content == "DUPLICATE":
        other = {**_valid_peer_doc(), "ip": "10.77.0.3"}
        content = json.dumps({"version": 1, "peers": [peer, other]})
    target = state.path / "peers.json"
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    before = snapshot(state.path)
    with pytest.raises(StateError, match=r"peers\.json"):
        state.peers()
    with pytest.raises(StateError, match=r"peers\.json"):
        state.add_peer("new", None, NET, GW)
    assert snapshot(state.path) == before


def test_malformed_gateway_file(state: StateDir) -> None:
    identity = state.identity()
    path = state.path / "gateway.json"
    doc = json.loads(path.read_text())
    _, other_public = keys.generate_keypair()
    for bad in (
        "{",
        "[]",
        json.dumps({**doc, "public_key": other_public}),
        json.dumps({**doc, "private_key": "short"}),
        json.dumps({**doc, "listen_port": "51820"}),
        json.dumps({**doc, "address": "300.1.1.1/24"}),
        json.dumps({**doc, "created": "yesterday"}),
    ):
        path.write_text(bad)
        with pytest.raises(StateError, match=r"gateway\.json"):
            state.identity()
        with pytest.raises(StateError, match=r"gateway\.json"):
            state.saved_settings()
    path.write_text(json.dumps(doc))
    assert state.identity() == identity


# --- stats -------------------------------------------------------------------------------------


def test_stats_roundtrip(state: StateDir) -> None:
    assert state.read_stats() == {}
    stats = {
        "pk1": PeerRuntime("203.0.113.5:51820", 1700000000.5, 10, 20, 1, 2),
        "pk2": PeerRuntime(None, None, 0, 0, 0, 0),
    }
    state.write_stats(stats)
    assert state.read_stats() == stats
    assert stat.S_IMODE((state.path / "stats.json").stat().st_mode) == 0o600
    doc = json.loads((state.path / "stats.json").read_text())
    assert doc["pk1"] == {
        "endpoint": "203.0.113.5:51820",
        "last_handshake": 1700000000.5,
        "rx_bytes": 10,
        "tx_bytes": 20,
        "rx_packets": 1,
        "tx_packets": 2,
    }


@pytest.mark.parametrize(
    "content",
    ["nope", "[]", '{"pk": 1}', '{"pk": {"rx_bytes": -1}}', '{"pk": {"last_handshake": "x"}}'],
)
def test_malformed_stats_file(state: StateDir, content: str) -> None:
    (state.path / "stats.json").write_text(content)
    with pytest.raises(StateError, match=r"stats\.json"):
        state.read_stats()


def test_peer_record_is_frozen() -> None:
    record = PeerRecord("a", "pub", "priv", "psk", "10.77.0.2", 0.0)
    with pytest.raises(AttributeError):
        record.name = "b"  # type: ignore[misc]


def test_refuses_unwritable_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root bypasses permission bits, so the access check itself is simulated.
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)
    with pytest.raises(StateError, match="not readable and writable"):
        StateDir(path)


def test_refuses_dir_of_another_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    other_uid = path.stat().st_uid + 1
    monkeypatch.setattr(os, "geteuid", lambda: other_uid)
    with pytest.raises(StateError, match="owned by another user"):
        StateDir(path)


def test_unreadable_file_is_a_state_error(state: StateDir, monkeypatch: pytest.MonkeyPatch) -> None:
    state.add_peer("phone", None, NET, GW)
    original = Path.read_text

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "peers.json":
            raise PermissionError(13, "Permission denied")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(StateError, match=r"cannot read .*peers\.json: Permission denied"):
        state.peers()


def test_peer_policy_defaults_for_old_files_and_bad_values_name_the_peer(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    state.add_peer("phone", None, NET, GW)
    doc = json.loads((state.path / "peers.json").read_text())
    del doc["peers"][0]["policy"], doc["peers"][0]["fallback"]  # a file from before issue 14
    state.write_json("peers.json", doc)
    (record,) = state.peers()
    assert (record.policy, record.fallback) == ("allow", "deny")
    doc["peers"][0]["policy"] = "maybe"
    state.write_json("peers.json", doc)
    with pytest.raises(StateError, match="peer 'phone' has an invalid 'policy'"):
        state.peers()
