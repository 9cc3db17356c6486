"""The command line, in-process and as `python -m unclaw_tui` subprocesses."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import decode_qr
from unclaw_tui import cli, config, qr, wgquick
from unclaw_tui.state import PeerRuntime, StateDir

REPO_ROOT = Path(__file__).resolve().parents[2]
ERROR_PREFIX = "unclaw-tui: error: "


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_subprocess(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unclaw_tui", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=_child_env(),
    )


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def dir_snapshot(path: Path) -> dict[str, tuple[bytes, int, int]] | None:
    """Contents, mtime and mode of every file (None if the dir does not exist)."""
    if not path.exists():
        return None
    st = path.stat()
    out = {".": (b"", st.st_mtime_ns, stat.S_IMODE(st.st_mode))}
    for entry in sorted(path.iterdir()):
        est = entry.stat()
        out[entry.name] = (entry.read_bytes(), est.st_mtime_ns, stat.S_IMODE(est.st_mode))
    return out


def backdate(path: Path, seconds: float = 3600.0) -> None:
    """Move the mtimes of the dir and of its files `seconds` into the past."""
    for entry in (path, *path.iterdir()):
        st = entry.stat()
        os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def secrets_of(path: Path) -> list[str]:
    """Every private and preshared key stored in the state dir."""
    found = []
    sd = StateDir(path, create=False)
    found.append(sd.identity().private_key)
    for peer in sd.peers():
        found += [peer.private_key, peer.preshared_key]
    return found


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


# --- the happy path ----------------------------------------------------------------------------


def test_add_list_show_remove_in_process(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    base = ("--state-dir", str(state_dir), "--endpoint", "vpn.example.com")
    rc, out, err = run(capsys, *base, "peer", "add", "phone")
    assert (rc, err) == (0, "")
    parsed = wgquick.parse_config(out)
    sd = StateDir(state_dir, create=False)
    phone = sd.peer("phone")
    assert parsed["Interface"] == {
        "PrivateKey": phone.private_key,
        "Address": "10.77.0.2/32",
        "DNS": "10.77.0.1",
    }
    assert parsed["Peer"]["PublicKey"] == sd.identity().public_key
    assert parsed["Peer"]["PresharedKey"] == phone.preshared_key
    assert parsed["Peer"]["Endpoint"] == "vpn.example.com:51820"

    rc, out2, _ = run(
        capsys, "--state-dir", str(state_dir), "peer", "add", "laptop", "--ip", "10.77.0.50"
    )
    assert rc == 0
    assert "Address = 10.77.0.50/32" in out2
    assert "Endpoint = vpn.example.com:51820" in out2  # the saved endpoint is reused

    rc, listing, _ = run(capsys, "--state-dir", str(state_dir), "peer", "list")
    assert rc == 0
    lines = listing.splitlines()
    assert lines[0].split()[:3] == ["NAME", "IP", "PUBLIC"]
    assert lines[1].split()[:3] == ["phone", "10.77.0.2", phone.public_key]
    assert "never" in lines[1]
    assert lines[2].split()[:2] == ["laptop", "10.77.0.50"]

    rc, shown, _ = run(capsys, "--state-dir", str(state_dir), "peer", "show", "phone")
    assert (rc, shown) == (0, out)

    rc, removed, _ = run(capsys, "--state-dir", str(state_dir), "peer", "remove", "phone")
    assert rc == 0
    assert "phone" in removed
    assert [p.name for p in StateDir(state_dir, create=False).peers()] == ["laptop"]
    rc, _, err = run(capsys, "--state-dir", str(state_dir), "peer", "show", "phone")
    assert rc == 2
    assert err == f"{ERROR_PREFIX}unknown peer 'phone'\n"


def test_add_list_show_remove_subprocess(state_dir: Path) -> None:
    base = ("--state-dir", str(state_dir))
    added = run_subprocess(*base, "--endpoint", "[2001:db8::7]", "peer", "add", "phone")
    assert added.returncode == 0, added.stderr
    assert added.stderr == ""
    assert "Endpoint = [2001:db8::7]:51820\n" in added.stdout
    listed = run_subprocess(*base, "peer", "list", "--json")
    assert listed.returncode == 0
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["ip"]) for r in rows] == [("phone", "10.77.0.2")]
    shown = run_subprocess(*base, "peer", "show", "phone")
    assert shown.stdout == added.stdout
    removed = run_subprocess(*base, "peer", "remove", "phone")
    assert removed.returncode == 0
    assert json.loads(run_subprocess(*base, "peer", "list", "--json").stdout) == []


def test_list_shows_live_stats(capsys: pytest.CaptureFixture[str], state_dir: Path) -> None:
    run(capsys, "--state-dir", str(state_dir), "peer", "add", "phone")
    run(capsys, "--state-dir", str(state_dir), "peer", "add", "idle")
    sd = StateDir(state_dir, create=False)
    phone = sd.peer("phone")
    sd.write_stats(
        {phone.public_key: PeerRuntime("198.51.100.3:40000", time.time() - 12, 2048, 3 << 20, 4, 5)}
    )
    rc, out, _ = run(capsys, "--state-dir", str(state_dir), "peer", "list")
    assert rc == 0
    phone_line = next(line for line in out.splitlines() if line.startswith("phone"))
    assert "198.51.100.3:40000" in phone_line
    assert "12s ago" in phone_line or "13s ago" in phone_line
    assert "2.0 KiB" in phone_line and "3.0 MiB" in phone_line
    idle_line = next(line for line in out.splitlines() if line.startswith("idle"))
    assert "never" in idle_line

    rc, out, _ = run(capsys, "--state-dir", str(state_dir), "--json", "peer", "list")
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["phone"]["rx_bytes"] == 2048
    assert rows["phone"]["tx_packets"] == 5
    assert rows["phone"]["endpoint"] == "198.51.100.3:40000"
    assert rows["idle"]["last_handshake"] is None
    assert set(rows["phone"]) == {
        "name",
        "ip",
        "public_key",
        "created",
        "policy",
        "fallback",
        "endpoint",
        "last_handshake",
        "rx_bytes",
        "tx_bytes",
        "rx_packets",
        "tx_packets",
    }


def test_list_on_missing_state_dir_is_empty_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    rc, out, _ = run(capsys, "--state-dir", str(state_dir), "peer", "list", "--json")
    assert (rc, json.loads(out)) == (0, [])
    assert not state_dir.exists()


def test_secrets_only_in_client_config_output(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    base = ("--state-dir", str(state_dir))
    run(capsys, *base, "peer", "add", "phone")
    run(capsys, *base, "peer", "add", "laptop")
    secrets = secrets_of(state_dir)
    outputs = [
        run(capsys, *base, "peer", "list"),
        run(capsys, *base, "peer", "list", "--json"),
        run(capsys, *base, "peer", "add", "phone"),
        run(capsys, *base, "peer", "show", "nobody"),
        run(capsys, *base, "peer", "remove", "laptop"),
    ]
    for _rc, out, err in outputs:
        for secret in secrets:
            assert secret not in out
            assert secret not in err


# --- QR and PNG --------------------------------------------------------------------------------


def _decode_half_blocks(text: str) -> bytes:
    glyph = {" ": (False, False), qr.UPPER: (True, False), qr.LOWER: (False, True)}
    glyph[qr.FULL] = (True, True)
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    rows: list[list[bool]] = []
    for line in text.rstrip("\n").split("\n"):
        pairs = [glyph[ch] for ch in ansi.sub("", line)]
        rows += [[t for t, _ in pairs], [b for _, b in pairs]]
    scale, border = 6, 4
    size = (len(rows[0]) + 2 * border, len(rows) + 2 * border)
    image = Image.new("L", size, 255)
    for y, row in enumerate(rows):
        for x, dark in enumerate(row):
            if dark:
                image.putpixel((x + border, y + border), 0)
    image = image.resize((size[0] * scale, size[1] * scale), Image.Resampling.NEAREST)
    (result,) = decode_qr(image)
    return result


def test_add_with_qr_prints_config_then_scannable_qr(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    rc, out, _ = run(capsys, "--state-dir", str(state_dir), "peer", "add", "phone", "--qr")
    assert rc == 0
    config_text = out[: out.index("PersistentKeepalive = 25\n") + len("PersistentKeepalive = 25\n")]
    qr_part = out[len(config_text) :]
    assert qr_part.startswith("\n")
    assert "\x1b" not in qr_part  # captured stdout is not a TTY
    assert _decode_half_blocks(qr_part[1:]) == config_text.encode()
    rc, shown, _ = run(capsys, "--state-dir", str(state_dir), "peer", "show", "phone", "--qr")
    assert shown == out


def test_qr_uses_ansi_only_on_a_tty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    text = "[Interface]\nPrivateKey = x\n"
    tty, pipe = Tty(), io.StringIO()
    cli._print_config(text, True, tty)
    cli._print_config(text, True, pipe)
    assert qr.ANSI_PIN in tty.getvalue()
    assert "\x1b" not in pipe.getvalue()
    assert _decode_half_blocks(tty.getvalue()[len(text) + 1 :]) == text.encode()


def test_show_png(capsys: pytest.CaptureFixture[str], state_dir: Path, tmp_path: Path) -> None:
    run(capsys, "--state-dir", str(state_dir), "peer", "add", "phone")
    png = tmp_path / "phone.png"
    rc, out, _ = run(
        capsys, "--state-dir", str(state_dir), "peer", "show", "phone", "--png", str(png)
    )
    assert rc == 0
    with Image.open(png) as image:
        (result,) = decode_qr(image)
    assert result == out.encode()


# --- settings ----------------------------------------------------------------------------------


def test_explicit_settings_are_saved_and_reused(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    base = ("--state-dir", str(state_dir))
    rc, out, _ = run(
        capsys, *base, "--listen-port", "4000", "--address", "10.9.0.1/24", "peer", "add", "a"
    )
    assert rc == 0
    parsed = wgquick.parse_config(out)
    assert parsed["Interface"]["Address"] == "10.9.0.2/32"
    assert parsed["Interface"]["DNS"] == "10.9.0.1"
    assert parsed["Peer"]["Endpoint"].endswith(":4000")
    doc = json.loads((state_dir / "gateway.json").read_text())
    assert (doc["listen_port"], doc["address"], doc["endpoint"]) == (4000, "10.9.0.1/24", None)

    rc, out, _ = run(capsys, *base, "--endpoint", "gw.example:443", "peer", "add", "b")
    parsed = wgquick.parse_config(out)
    assert parsed["Interface"]["Address"] == "10.9.0.3/32"
    assert parsed["Peer"]["Endpoint"] == "gw.example:443"
    rc, out, _ = run(capsys, *base, "peer", "show", "a")
    assert "Endpoint = gw.example:443\n" in out
    assert StateDir(state_dir, create=False).saved_settings() == {
        "listen_port": 4000,
        "address": "10.9.0.1/24",
        "endpoint": "gw.example:443",
    }


def test_run_without_subcommand_builds_settings_and_runs_headless(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> None:
    seen: list[config.Settings] = []

    def run(settings: config.Settings, on_started: Callable[[], None]) -> int:
        seen.append(settings)
        on_started()  # the gateway listens: only now are the flags saved
        return 7

    monkeypatch.setitem(sys.modules, "unclaw_tui.headless", types.SimpleNamespace(run=run))
    rc = cli.main(
        ["--state-dir", str(state_dir), "--no-ui", "--json", "--listen-port", "5000",
         "--endpoint", "gw.example", "--address", "10.50.0.1/16"]
    )  # fmt: skip
    assert rc == 7
    (settings,) = seen
    assert settings.state_dir == state_dir
    assert settings.listen_port == 5000
    assert settings.endpoint == "gw.example"
    assert str(settings.address) == "10.50.0.1/16"
    assert settings.json_events is True
    sd = StateDir(state_dir, create=False)
    assert sd.saved_settings() == {
        "listen_port": 5000,
        "endpoint": "gw.example",
        "address": "10.50.0.1/16",
    }
    identity = sd.identity()

    # A later run without flags gets the saved values and the same key.
    seen.clear()
    assert cli.main(["--state-dir", str(state_dir), "--no-ui"]) == 7
    assert seen[0].listen_port == 5000
    assert str(seen[0].address) == "10.50.0.1/16"
    assert seen[0].json_events is False
    assert StateDir(state_dir, create=False).identity() == identity


def test_relay_flags_reach_settings_and_are_not_saved(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> None:
    seen: list[config.Settings] = []
    monkeypatch.setitem(
        sys.modules,
        "unclaw_tui.headless",
        types.SimpleNamespace(run=lambda settings, on_started: seen.append(settings) or 0),
    )
    rc = cli.main(
        ["--state-dir", str(state_dir), "--no-ui", "--allow", "127.0.0.0/8",
         "--allow", "192.168.1.5/24", "--deny", "2001:db8::/32", "--deny", "203.0.113.8",
         "--tcp-buffer", "65536", "--max-flows-per-peer", "16", "--udp-idle-timeout", "2.5",
         "--hello-timeout", "3", "--dns-tcp-idle-timeout", "4.5", "--no-engine-thread"]
    )  # fmt: skip
    assert rc == 0
    (settings,) = seen
    assert settings.allow == [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("192.168.1.0/24"),
    ]
    assert settings.deny == [
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("203.0.113.8/32"),
    ]
    assert settings.tcp_buffer == 65536
    assert settings.max_flows_per_peer == 16
    assert settings.udp_idle_timeout == 2.5
    assert (settings.hello_timeout, settings.dns_tcp_idle_timeout) == (3.0, 4.5)
    assert settings.engine_thread is False
    assert StateDir(state_dir, create=False).saved_settings() == {}

    # The next run without the flags is back to the defaults.
    seen.clear()
    assert cli.main(["--state-dir", str(state_dir), "--no-ui"]) == 0
    assert seen[0].allow == [] and seen[0].deny == []
    assert seen[0].tcp_buffer == config.DEFAULT_TCP_BUFFER == 262144
    assert seen[0].max_flows_per_peer == config.DEFAULT_MAX_FLOWS_PER_PEER
    assert seen[0].udp_idle_timeout == config.DEFAULT_UDP_IDLE_TIMEOUT
    assert seen[0].hello_timeout == seen[0].dns_tcp_idle_timeout == 10.0
    assert seen[0].engine_thread is True


def test_bad_cidr_on_run_is_one_line_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    rc, out, err = run(capsys, "--state-dir", str(state_dir), "--no-ui", "--deny", "10.0.0.0/99")
    assert (rc, out) == (2, "")
    assert err == ERROR_PREFIX + (
        "argument --deny: invalid CIDR '10.0.0.0/99': expected a network like 192.168.1.0/24 "
        "or 2001:db8::/32\n"
    )
    assert not state_dir.exists()


def test_run_with_ui_calls_run_app(monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> None:
    seen: list[config.Settings] = []

    def run_app(settings: config.Settings, on_started: Callable[[], None]) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setitem(sys.modules, "unclaw_tui.app", types.SimpleNamespace(run_app=run_app))
    assert cli.main(["--state-dir", str(state_dir)]) == 0
    assert seen[0].listen_port == config.DEFAULT_LISTEN_PORT
    assert seen[0].endpoint is None
    assert str(seen[0].address) == config.DEFAULT_ADDRESS


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--version")
    assert rc == 0
    assert out.startswith("unclaw-tui ")
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    assert "--state-dir" in out and "peer" in out


HELP_DEFAULTS = """
import sys
from unclaw_tui import config
config.DEFAULT_LISTEN_PORT = 40001
config.DEFAULT_ADDRESS = "10.66.0.1/20"
config.DEFAULT_TCP_BUFFER = 123457
config.DEFAULT_MAX_FLOWS_PER_PEER = 77
config.DEFAULT_MAX_CONNS_PER_PEER = 1234
config.DEFAULT_MAX_HALF_OPEN_PER_PEER = 55
config.DEFAULT_HELLO_TIMEOUT = 7.5
config.DEFAULT_DNS_TCP_IDLE_TIMEOUT = 8.25
config.DEFAULT_UDP_IDLE_TIMEOUT = 45.0
from unclaw_tui import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_help_takes_its_defaults_from_config(tmp_path: Path) -> None:
    # With every default changed in `config`, the help shows the changed values: none is retyped.
    env = {**_child_env(), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    texts = []
    for argv in (["--help"], ["peer", "add", "--help"]):
        done = subprocess.run(
            [sys.executable, "-c", HELP_DEFAULTS, *argv],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env,
        )  # fmt: skip
        assert (done.returncode, done.stderr) == (0, "")
        texts.append(" ".join(done.stdout.split()))
    top, add = texts
    for shown in ("40001", "10.66.0.1/20", "123457", "77", "1234", "55", "7.5", "8.25", "45"):
        assert f"default {shown})" in top, shown
    state = tmp_path / "xdg" / "unclaw-tui"
    for shown in ("40001", "10.66.0.1/20"):  # the global flags, after `peer add`
        assert f"default {shown})" in add, shown
    assert f"(default{state})" in add.replace(" ", "")  # argparse may wrap the path
    assert "--allow" not in add  # run flags belong to the run only


# --- global flags before or after the subcommand ------------------------------------------------

GLOBALS = ("--listen-port", "4000", "--endpoint", "gw.example", "--address", "10.9.0.1/24")


@pytest.mark.parametrize(
    "command",
    [
        ["peer", "add", "phone", "--qr"],
        ["peer", "add", "phone", "--ip", "10.9.0.7"],
        ["peer", "list", "--json"],
        ["peer", "show", "first"],
        ["peer", "remove", "first"],
        ["ca", "--path"],
    ],
)
def test_global_flags_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]
) -> None:
    results = []
    for order in ("before", "after", "between"):
        state_dir = tmp_path / order
        assert run(capsys, "--state-dir", str(state_dir), *GLOBALS, "peer", "add", "first")[0] == 0
        StateDir(state_dir, create=False).save_settings(listen_port=1, endpoint=None)
        flags = ("--state-dir", str(state_dir), *GLOBALS)
        argv = {
            "before": [*flags, *command],
            "after": [*command, *flags],
            "between": [command[0], *flags, *command[1:]],  # `peer --state-dir X list`
        }[order]
        if order == "between" and command[0] == "ca":
            argv = [*command, *flags]
        rc, out, err = run(capsys, *argv)
        assert (rc, err) == (0, ""), argv
        saved = StateDir(state_dir, create=False).saved_settings()
        assert saved == {"listen_port": 4000, "endpoint": "gw.example", "address": "10.9.0.1/24"}
        results.append(out.replace(str(state_dir), "STATE"))
    if command[:2] == ["peer", "add"] or command[:2] == ["peer", "show"]:
        for out in results:
            assert "\nDNS = 10.9.0.1\n" in out and "\nEndpoint = gw.example:4000\n" in out
    if command[:2] == ["peer", "list"]:
        assert [[r["name"] for r in json.loads(out)] for out in results] == [["first"]] * 3
    if command[0] == "ca":
        assert results == ["STATE/ca.pem\n"] * 3
    if command[:2] == ["peer", "remove"]:
        assert len({out for out in results}) == 1


def test_a_flag_before_the_subcommand_is_not_reset_by_it() -> None:
    # argparse's trap: a subparser's default for the same dest overwrites the value typed before.
    parse = cli.build_parser().parse_args
    given = parse(["--state-dir", "X", "--json", "--listen-port", "9", "peer", "list"])
    assert (given.state_dir, given.json, given.listen_port) == (Path("X"), True, 9)
    after = parse(["peer", "list", "--state-dir", "X", "--json", "--listen-port", "9"])
    assert vars(after) == vars(given)
    assert vars(parse(["peer", "--state-dir", "X", "list", "--json", "--listen-port", "9"])) == (
        vars(given)
    )
    plain = parse(["peer", "list"])
    assert (plain.state_dir, plain.json, plain.listen_port, plain.endpoint) == (
        None, False, None, None,
    )  # fmt: skip
    # Typed twice, the later one wins, as for any repeated flag.
    assert parse(["--listen-port", "1", "peer", "list", "--listen-port", "2"]).listen_port == 2


def test_a_failed_start_saves_nothing(capsys: pytest.CaptureFixture[str], state_dir: Path) -> None:
    run(capsys, "--state-dir", str(state_dir), "--listen-port", "4000", "peer", "add", "phone")
    before = json.loads((state_dir / "gateway.json").read_text())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("0.0.0.0", 0))
        port = busy.getsockname()[1]
        done = run_subprocess(
            "--no-ui", "--state-dir", str(state_dir), "--listen-port", str(port),
            "--endpoint", "gw.example", "--address", "10.77.0.1/16",
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"{ERROR_PREFIX}cannot listen on UDP port {port}: ")
    assert done.stderr.count("\n") == 1
    assert json.loads((state_dir / "gateway.json").read_text()) == before
    assert str(port) not in "".join(p.read_text() for p in state_dir.glob("*.json"))
    rc, shown, _ = run(capsys, "--state-dir", str(state_dir), "peer", "show", "phone")
    assert rc == 0 and shown.count(":4000\n") == 1  # configs still name the port in use


# --- errors: one line, exit 2, nothing written -------------------------------------------------

ERROR_CASES = [
    (["peer", "add", "bad name"], "invalid peer name"),
    (["peer", "add", "-x"], ""),
    (["peer", "add", "x" * 33], "invalid peer name"),
    (["peer", "add", "phone"], "already exists"),
    (["peer", "add", "Phone"], "already exists"),
    (["peer", "add", "new", "--ip", "10.78.0.2"], "not in the tunnel network"),
    (["peer", "add", "new", "--ip", "10.77.0.1"], "gateway's own address"),
    (["peer", "add", "new", "--ip", "10.77.0.0"], "network address"),
    (["peer", "add", "new", "--ip", "10.77.0.255"], "broadcast address"),
    (["peer", "add", "new", "--ip", "10.77.0.2"], "already used by peer 'phone'"),
    (["peer", "add", "new", "--ip", "nope"], "invalid IP"),
    (["peer", "add"], "required"),
    (["peer", "show", "ghost"], "unknown peer 'ghost'"),
    (["peer", "remove", "ghost"], "unknown peer 'ghost'"),
    (["peer", "frobnicate"], "invalid choice"),
    (["peer"], "required"),
    (["--listen-port", "0", "peer", "list"], "listen port"),
    (["--listen-port", "65536", "peer", "list"], "listen port"),
    (["--listen-port", "abc", "peer", "add", "new"], "listen port"),
    (["--address", "10.77.0.1", "peer", "add", "new"], "prefix length"),
    (["--address", "10.77.0.1/31", "peer", "add", "new"], "prefix length"),
    (["--address", "10.77.0.1/7", "peer", "add", "new"], "prefix length"),
    (["--address", "10.77.0.0/24", "peer", "add", "new"], "host address"),
    (["--address", "banana", "peer", "list"], "invalid address"),
    (["--address", "10.99.0.1/24", "peer", "add", "new"], "does not suit peer 'phone'"),
    (["--address", "10.77.0.2/24", "peer", "list"], "does not suit peer 'phone'"),
    (["--endpoint", "bad host", "peer", "add", "new"], "invalid endpoint"),
    (["--endpoint", "host:0", "peer", "add", "new"], "invalid endpoint"),
    (["--endpoint", "host:99999", "peer", "list"], "invalid endpoint"),
    (["--endpoint", "2001:db8::1:x", "peer", "list"], "invalid endpoint"),
    (["--bogus"], "unrecognized arguments"),
    (["--allow", "banana", "peer", "list"], "invalid CIDR 'banana'"),
    (["--allow", "10.0.0.0/8", "--allow", "10.0.0.0/33", "peer", "list"], "invalid CIDR"),
    (["--deny", "1.2.3.4/", "peer", "add", "new"], "invalid CIDR"),
    (["--deny"], "expected one argument"),
    (["--tcp-buffer", "100", "peer", "list"], "invalid TCP buffer size"),
    (["--tcp-buffer", "lots", "peer", "list"], "invalid TCP buffer size"),
    (["--max-flows-per-peer", "0", "peer", "list"], "invalid flow limit"),
    (["--udp-idle-timeout", "0", "peer", "list"], "invalid timeout"),
    (["--udp-idle-timeout", "nan", "peer", "list"], "invalid timeout"),
    (["--udp-idle-timeout", "-5", "peer", "list"], "invalid timeout"),
    (["--hello-timeout", "0", "peer", "list"], "invalid timeout"),
    (["--dns-tcp-idle-timeout", "inf", "peer", "list"], "invalid timeout"),
    # Global flags after the subcommand are checked the same; run flags are not taken there.
    (["peer", "add", "new", "--listen-port", "0"], "listen port"),
    (["peer", "list", "--address", "banana"], "invalid address"),
    (["peer", "show", "phone", "--address", "10.99.0.1/24"], "does not suit peer 'phone'"),
    (["peer", "remove", "phone", "--endpoint", "host:0"], "invalid endpoint"),
    (["ca", "--listen-port", "x"], "listen port"),
    (["peer", "--state-dir"], "expected one argument"),
    (["peer", "add", "new", "--allow", "10.0.0.0/8"], "unrecognized arguments"),
    (["peer", "list", "--no-ui"], "unrecognized arguments"),
    # A failing add writes nothing, not even the flags given with it.
    (["peer", "add", "phone", "--endpoint", "gw.example", "--listen-port", "4000"], "exists"),
    (["--endpoint", "gw.example", "peer", "add", "bad name"], "invalid peer name"),
    (["peer", "add", "new", "--ip", "10.77.0.2", "--listen-port", "4000"], "already used"),
]


def _prepared_state(capsys: pytest.CaptureFixture[str], state_dir: Path) -> None:
    rc, _, _ = run(capsys, "--state-dir", str(state_dir), "peer", "add", "phone")
    assert rc == 0
    StateDir(state_dir, create=False).write_stats({})


@pytest.mark.parametrize(("argv", "reason"), ERROR_CASES)
def test_errors_exit_2_with_one_line_and_write_nothing(
    capsys: pytest.CaptureFixture[str], state_dir: Path, argv: list[str], reason: str
) -> None:
    _prepared_state(capsys, state_dir)
    backdate(state_dir)  # so that any rewrite shows up in the mtimes, however coarse
    before = dir_snapshot(state_dir)
    rc, out, err = run(capsys, "--state-dir", str(state_dir), *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith(ERROR_PREFIX)
    assert err.endswith("\n") and err.count("\n") == 1
    assert reason in err
    assert dir_snapshot(state_dir) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["peer", "add", "bad name"],
        ["peer", "add", "new", "--ip", "10.1.1.1"],
        ["peer", "add", "new", "--ip", "10.77.0.1"],
        ["--listen-port", "0", "peer", "add", "new"],
        ["--address", "10.77.0.1/40", "peer", "add", "new"],
        ["peer", "show", "ghost"],
        ["peer", "remove", "ghost"],
        ["peer", "show", "ghost", "--png", "/nonexistent-dir/x.png"],
    ],
)
def test_errors_create_no_state_dir(
    capsys: pytest.CaptureFixture[str], state_dir: Path, argv: list[str]
) -> None:
    rc, out, err = run(capsys, "--state-dir", str(state_dir), *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith(ERROR_PREFIX) and err.count("\n") == 1
    assert not state_dir.exists()


def test_error_in_subprocess_is_one_line(state_dir: Path) -> None:
    result = run_subprocess("--state-dir", str(state_dir), "peer", "add", "bad name")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(ERROR_PREFIX) and result.stderr.count("\n") == 1
    assert not state_dir.exists()
    result = run_subprocess("--state-dir", str(state_dir), "--listen-port", "x", "peer", "list")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1


def test_png_write_failure_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], state_dir: Path, tmp_path: Path
) -> None:
    _prepared_state(capsys, state_dir)
    before = dir_snapshot(state_dir)
    target = tmp_path / "missing" / "phone.png"
    rc, out, err = run(
        capsys, "--state-dir", str(state_dir), "peer", "show", "phone", "--png", str(target)
    )
    assert rc == 2
    assert out == ""
    assert err.startswith(f"{ERROR_PREFIX}cannot write {target}")
    assert dir_snapshot(state_dir) == before


def test_bad_state_dirs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    world = tmp_path / "world"
    world.mkdir()
    os.chmod(world, 0o777)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (world, "group/world-writable"),
        (a_file, "not a directory"),
        (a_file / "sub", "Not a directory"),
    ]
    for path, reason in cases:
        for argv in (["peer", "list"], ["peer", "add", "phone"], ["--no-ui"]):
            rc, out, err = run(capsys, "--state-dir", str(path), *argv)
            assert rc == 2, (path, argv)
            assert out == ""
            assert err.startswith(ERROR_PREFIX) and err.count("\n") == 1
            assert reason in err
    assert list(world.iterdir()) == []
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("target", ["peers.json", "gateway.json", "stats.json"])
def test_malformed_state_file_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], state_dir: Path, target: str
) -> None:
    _prepared_state(capsys, state_dir)
    (state_dir / target).write_text('{"truncated": ')
    before = dir_snapshot(state_dir)
    rc, out, err = run(capsys, "--state-dir", str(state_dir), "peer", "list")
    assert rc == 2
    assert out == ""
    assert err.startswith(ERROR_PREFIX) and err.count("\n") == 1
    assert target in err
    assert dir_snapshot(state_dir) == before


# --- files on disk -----------------------------------------------------------------------------


def test_file_modes(capsys: pytest.CaptureFixture[str], state_dir: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen our modes
    try:
        run(capsys, "--state-dir", str(state_dir), "peer", "add", "phone")
        StateDir(state_dir, create=False).write_stats({})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    names = sorted(p.name for p in state_dir.iterdir())
    assert names == [".lock", "gateway.json", "peers.json", "stats.json"]
    for entry in state_dir.iterdir():
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600, entry.name


def test_restart_keeps_keys(capsys: pytest.CaptureFixture[str], state_dir: Path) -> None:
    _, first, _ = run(capsys, "--state-dir", str(state_dir), "peer", "add", "phone")
    gateway_before = json.loads((state_dir / "gateway.json").read_text())
    shown = run_subprocess("--state-dir", str(state_dir), "peer", "show", "phone")
    assert shown.stdout == first
    run(capsys, "--state-dir", str(state_dir), "peer", "add", "laptop")
    _, again, _ = run(capsys, "--state-dir", str(state_dir), "peer", "show", "phone")
    assert again == first
    gateway_after = json.loads((state_dir / "gateway.json").read_text())
    assert gateway_after["private_key"] == gateway_before["private_key"]
    assert gateway_after["public_key"] == gateway_before["public_key"]


def test_concurrent_adds_from_8_processes(state_dir: Path) -> None:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "unclaw_tui",
                "--state-dir",
                str(state_dir),
                "peer",
                "add",
                f"peer{i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=_child_env(),
        )
        for i in range(8)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outputs]
    addresses = {wgquick.parse_config(out)["Interface"]["Address"] for out, _ in outputs}
    gateway_keys = {wgquick.parse_config(out)["Peer"]["PublicKey"] for out, _ in outputs}
    assert len(addresses) == 8
    assert len(gateway_keys) == 1
    peers = StateDir(state_dir, create=False).peers()
    assert sorted(p.name for p in peers) == sorted(f"peer{i}" for i in range(8))
    assert {f"{p.ip}/32" for p in peers} == addresses
    assert sorted(p.ip for p in peers) == sorted(f"10.77.0.{i}" for i in range(2, 10))


KILL_CHILD = """
import ipaddress, sys
from pathlib import Path
from unclaw_tui.state import StateDir
sd = StateDir(Path(sys.argv[1]))
net = ipaddress.IPv4Network("10.77.0.0/20")
gw = ipaddress.IPv4Address("10.77.0.1")
for i in range(3000):
    sd.add_peer(f"p{i}", None, net, gw)
    print(f"p{i}", flush=True)
"""


@pytest.mark.parametrize("kill_after", [5, 40, 120])
def test_sigkill_during_adds_leaves_valid_state(state_dir: Path, kill_after: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(state_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=_child_env(),
    )
    assert proc.stdout is not None
    reported: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while len(reported) < kill_after and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # Names printed before the kill but still in the pipe were also reported as added.
        reported += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) >= kill_after
    json.loads((state_dir / "peers.json").read_text())  # complete JSON, not a partial write
    peers = StateDir(state_dir).peers()
    on_disk = [p.name for p in peers]
    assert on_disk[: len(reported)] == reported  # every reported add is on disk, in order
    assert len(on_disk) - len(reported) <= 1  # at most the add that was in flight
    assert len({p.ip for p in peers}) == len(peers)
    # The dir stays usable: the next add works and leaves no temp files behind.
    StateDir(state_dir).add_peer("after", None, *_net())
    assert not [p for p in state_dir.iterdir() if p.name.endswith(".tmp")]


def _net() -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
    return ipaddress.IPv4Network("10.77.0.0/20"), ipaddress.IPv4Address("10.77.0.1")
