"""Command line: run the gateway (TUI or headless), or manage peers in the state dir.

Every user error prints one line `unclaw-tui: error: <reason>` on stderr and exits 2 with
nothing written: arguments are validated before the state dir is created or touched.  A
command that asks a running gateway (`status`, `prompts`, `decide`, `rule add --for
once|restart`) exits 3 when none runs on the state dir, and 1 when the gateway answers with an
error or not at all; `rule remove` of an unknown rule exits 1 too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from unclaw_tui import config, version, wgquick
from unclaw_tui.policy.durations import Duration, Lifetime, parse_duration
from unclaw_tui.policy.rules import Action, parse_note, parse_who
from unclaw_tui.policy.targets import parse_ports, parse_target, parse_target_port
from unclaw_tui.services.egress import parse_cidr
from unclaw_tui.state import (
    PEER_FALLBACKS,
    PEER_POLICIES,
    SETTING_KEYS,
    PeerRecord,
    PeerRuntime,
    StateDir,
    StateError,
    parse_ipv4,
    validate_address,
    validate_peer_ip,
    validate_peer_name,
)

PROG = "unclaw-tui"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_GATEWAY = 3


class UsageError(Exception):
    """A user error; main() prints it as one line and exits 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line is easier to read and to script.
        raise UsageError(" ".join(message.split()))


# --- argument types: raise ArgumentTypeError so argparse reports them as usage errors ---------


def _checked(validate: Callable[[str], Any]) -> Callable[[str], Any]:
    """The argparse type of a validator whose ValueError says, in one line, what is wrong."""

    def parse(text: str) -> Any:
        try:
            return validate(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _int_range(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"invalid {name} {text!r}: expected {low}..{high}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:  # also rejects nan and inf
        raise argparse.ArgumentTypeError(
            f"invalid timeout {text!r}: expected seconds, more than 0 and at most 86400"
        )
    return value


def _dns_server(text: str) -> tuple[str, int]:
    """IP, IP:PORT, [IPv6] or [IPv6]:PORT."""
    try:
        host, port = wgquick.split_endpoint(text)
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid DNS server {text!r}: expected IP[:PORT]"
        ) from None
    return host, 53 if port is None else port


def _rule_target(text: str) -> Any:
    """A rule's TARGET (policy.parse_target); an IPv6 address may come in brackets."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        stripped = stripped[1:-1]
    return parse_target(stripped)


def _host_glob(text: str) -> str:
    pattern = text.strip().lower().rstrip(".")
    if not pattern or any(c.isspace() or c in "/:@" for c in pattern):
        raise argparse.ArgumentTypeError(f"invalid hostname pattern {text!r}")
    return pattern


# --- the options: one table, from which every parser is built ---------------------------------

COMMANDS = {
    "peer": "manage peers",
    "peer add": "add a peer and print its client config",
    "peer list": "list peers with live stats",
    "peer show": "print a peer's client config",
    "peer remove": "remove a peer",
    "peer set": "change a peer's policy (allow, deny, ask) or ask's fallback",
    "ca": "print the local CA certificate (PEM) to install on devices, and its path",
    "status": "ask the running gateway for its version, uptime, peers and open flows",
    # Policy (issue 14).
    "rule": "manage the rules deciding peers' flows (allow, deny, intercept, passthrough)",
    "rule add": "add a rule and print its id",
    "rule list": "list the rules with their hits and expiry",
    "rule remove": "remove a rule",
    "rule test": "the verdict a peer's flow to TARGET would get, and the rule deciding it",
    "decide": "answer a prompt of the running gateway",
    "prompts": "list the running gateway's open prompts (their ids are for `decide`)",
    "requests": "list the requests a running gateway saw inside intercepted TLS, or export "
    "them as HAR",
}
RUN = ("",)  # `unclaw-tui` itself, which runs the gateway
EVERYWHERE = ("", *COMMANDS)
RULE_ACTIONS = ("add", "list", "remove", "test")
POLICY = ("rule", *(f"rule {action}" for action in RULE_ACTIONS), "decide", "prompts")
# Commands that save --listen-port, --endpoint and --address (not those asking a gateway, nor
# the rule commands, which have nothing to do with them).
SAVING = tuple(command for command in EVERYWHERE if command not in ("status", "requests", *POLICY))


def _opt(flag: str, where: tuple[str, ...], help: str, **kwargs: Any) -> tuple[Any, ...]:
    return flag, where, {"help": help, **kwargs}


# Each option once: its flag, the commands that take it ("" is the gateway run) and argparse's
# keywords.  An option taken by a command and by one of its subcommands means the same typed
# before or after the subcommand.  Defaults come from `config`; the saved ones default to None
# here, so that only values typed on the command line are saved in the state dir.
OPTIONS = (
    _opt("--version", RUN, "show the version and exit", action="version",
         version=f"{PROG} {version()}"),
    _opt("--state-dir", EVERYWHERE,
         f"state directory: keys, peers, stats (default {config.default_state_dir()})",
         type=Path, metavar="DIR"),
    _opt("--listen-port", SAVING,
         f"UDP port the gateway listens on (saved; default {config.DEFAULT_LISTEN_PORT})",
         type=_int_range("listen port", 1, 65535), metavar="N"),
    _opt("--endpoint", SAVING, "address written into client configs (saved; default: "
         "this host's primary IPv4 address and the listen port)",
         type=_checked(wgquick.validate_endpoint), metavar="HOST[:PORT]"),
    _opt("--address", SAVING,
         f"the gateway's tunnel address (saved; default {config.DEFAULT_ADDRESS})",
         type=_checked(lambda text: str(validate_address(text))), metavar="A.B.C.D/N"),
    _opt("--json", ("", "peer list", "status", "rule list", "rule test", "prompts", "requests"),
         "machine-readable output (events, peer list, status, rules, verdict, prompts, requests)",
         action="store_true"),
    _opt("--no-ui", RUN, "run headless, no console UI", action="store_true"),
    # The gateway run's own flags: this run only, never saved.
    _opt("--allow", RUN,
         "let the relay reach a range it refuses by default, e.g. a LAN (repeatable)",
         type=_checked(parse_cidr), action="append", default=[], metavar="CIDR"),
    _opt("--deny", RUN, "refuse a range to the relay (repeatable; the most specific rule wins)",
         type=_checked(parse_cidr), action="append", default=[], metavar="CIDR"),
    _opt("--tcp-buffer", RUN, "buffer per relayed TCP connection, each way (default %(default)s)",
         type=_int_range("TCP buffer size", 4096, 64 * 1024 * 1024),
         default=config.DEFAULT_TCP_BUFFER, metavar="BYTES"),
    _opt("--max-flows-per-peer", RUN,
         "UDP flows per peer; past it the least recently active one closes (default %(default)s)",
         type=_int_range("flow limit", 1, 65536),
         default=config.DEFAULT_MAX_FLOWS_PER_PEER, metavar="N"),
    _opt("--max-conns-per-peer", RUN,
         "open TCP connections per peer; past it new ones are refused (default %(default)s)",
         type=_int_range("connection limit", 1, 65536),
         default=config.DEFAULT_MAX_CONNS_PER_PEER, metavar="N"),
    _opt("--max-half-open-per-peer", RUN,
         "TCP connections per peer still in their handshake (SYN flood bound; "
         "default %(default)s)",
         type=_int_range("half-open limit", 1, 65536),
         default=config.DEFAULT_MAX_HALF_OPEN_PER_PEER, metavar="N"),
    _opt("--hello-timeout", RUN,
         "time a TLS client may take to send its whole ClientHello (default %(default)g)",
         type=_seconds, default=config.DEFAULT_HELLO_TIMEOUT, metavar="SECONDS"),
    _opt("--dns-tcp-idle-timeout", RUN,
         "time a DNS-over-TCP client may take to start each query (default %(default)g)",
         type=_seconds, default=config.DEFAULT_DNS_TCP_IDLE_TIMEOUT, metavar="SECONDS"),
    _opt("--silent-peer-after", RUN,
         "end a peer's flows once it sent nothing, not even a handshake, for this long "
         "(default %(default)g)",
         type=_seconds, default=config.DEFAULT_SILENT_PEER_AFTER, metavar="SECONDS"),
    _opt("--udp-idle-timeout", RUN,
         "close a UDP flow after this long without traffic (default %(default)g)",
         type=_seconds, default=config.DEFAULT_UDP_IDLE_TIMEOUT, metavar="SECONDS"),
    _opt("--no-engine-thread", RUN, "move packets on the event loop's thread instead of a C "
         "thread of its own (slower; for comparison and debugging)",
         dest="engine_thread", action="store_false"),
    _opt("--no-fast-relay", RUN, "decide every new relayed connection in Python, even to a "
         "destination already allowed (slower; for comparison and debugging)",
         dest="fast_relay", action="store_false"),
    _opt("--upstream-dns", RUN,
         "upstream DNS server (repeatable; default: the nameservers of /etc/resolv.conf)",
         type=_dns_server, action="append", default=[], metavar="IP[:PORT]"),
    _opt("--passthrough", RUN,
         "relay TLS to hosts matching this glob untouched, e.g. '*.bank.example' (repeatable)",
         type=_host_glob, action="append", default=[], metavar="PATTERN"),
    _opt("--capture-bodies", RUN,
         "keep the first BYTES of each intercepted request and response body in the request "
         "record (default: none)",
         type=_int_range("capture size", 0, config.MAX_CAPTURE_BODIES), default=0, metavar="BYTES"),
    _opt("--auto-passthrough", RUN,
         "pass a host through from then on once a client rejected our certificate for it",
         action="store_true"),
    # The subcommands' own arguments.
    _opt("name", ("peer add",), "the peer's name", type=_checked(validate_peer_name),
         metavar="NAME"),
    _opt("name", ("peer show", "peer remove", "peer set"), "the peer's name", metavar="NAME"),
    _opt("--ip", ("peer add",), "tunnel IP (default: next free)",
         type=_checked(lambda text: str(parse_ipv4(text))), metavar="A.B.C.D"),
    _opt("--qr", ("peer add", "peer show"), "also print the config as a QR code",
         action="store_true"),
    _opt("--png", ("peer show",), "write the QR code as a PNG", type=Path, metavar="FILE"),
    _opt("--path", ("ca",), "print only the certificate's path", action="store_true"),
    _opt("--peer", ("requests",), "only this peer's requests (its name or public key)",
         metavar="PEER"),
    _opt("--har", ("requests",), "write them as HAR 1.2 to FILE ('-': standard output)",
         metavar="FILE"),
    _opt("--limit", ("requests",), "the most recent N only (default: all the gateway keeps)",
         type=_int_range("limit", 1, 1_000_000), metavar="N"),
    # Policy (issue 14): peers' defaults, rules, prompts.
    _opt("--policy", ("peer add", "peer set"),
         "what flows no rule decides get: allow, deny, or ask the operator (default allow)",
         choices=PEER_POLICIES, metavar="allow|deny|ask"),
    _opt("--fallback", ("peer add", "peer set"),
         "for --policy ask: the answer when nobody answers in time (default deny)",
         choices=PEER_FALLBACKS, metavar="allow|deny"),
    _opt("action", ("rule add",), "allow, deny (access) or intercept, passthrough (TLS mode)",
         choices=tuple(a.value for a in Action), type=str.lower,
         metavar="allow|deny|intercept|passthrough"),
    _opt("target", ("rule add",),
         "a hostname, a glob like '*.example.com', an IP or a CIDR",
         type=_checked(_rule_target), metavar="TARGET"),
    _opt("--peer", ("rule add",), "only for this peer (a name or a public key; default: all)",
         type=_checked(parse_who), metavar="NAME"),
    _opt("--port", ("rule add",), "only this port or range (default: any)",
         type=_checked(parse_ports), metavar="N[-M]"),
    _opt("--proto", ("rule add",), "only this protocol (default any)",
         choices=("tcp", "udp", "any"), default="any", metavar="tcp|udp|any"),
    _opt("--for", ("rule add", "decide"),
         "how long: once, restart, always, or a number with s, m, h or d (default always)",
         dest="duration", type=_checked(parse_duration), default=Duration(Lifetime.ALWAYS),
         metavar="DURATION"),
    _opt("--note", ("rule add",), "a note shown with the rule", type=_checked(parse_note),
         default="", metavar="TEXT"),
    _opt("id", ("rule remove",), "the rule's id (see `rule list`)", metavar="ID"),
    _opt("peer", ("rule test",), "the peer's name or public key", metavar="PEER"),
    _opt("target", ("rule test",), "a hostname, an IP or a VIP, with a port or without "
         "(then only rules for any port count); IPv6 with a port as [v6]:port",
         type=_checked(parse_target_port), metavar="TARGET[:PORT]"),
    _opt("--proto", ("rule test",), "the flow's protocol (default tcp)",
         choices=("tcp", "udp"), default="tcp", metavar="tcp|udp"),
    _opt("id", ("decide",), "the prompt's id (see `unclaw-tui prompts`)", metavar="ID"),
    _opt("answer", ("decide",), "allow or deny", choices=("allow", "deny"), type=str.lower,
         metavar="allow|deny"),
    _opt("--scope", ("decide",), "what the answer covers: this port of the host, the host "
         "(any port), or its registrable domain and every name below it (default host)",
         choices=("port", "host", "domain"), default="host", metavar="port|host|domain"),
)  # fmt: skip


def _parents(command: str) -> list[str]:
    """The commands above one: "peer add" -> ["", "peer"]."""
    words = command.split()
    return [" ".join(words[:i]) for i in range(len(words))]


def build_parser() -> argparse.ArgumentParser:
    parsers = {
        "": _ArgumentParser(
            prog=PROG, description="Userspace WireGuard gateway with a live operator console."
        )
    }
    subparsers: dict[str, Any] = {}
    for command, help_text in COMMANDS.items():
        parent, _, word = command.rpartition(" ")
        if parent not in subparsers:
            subparsers[parent] = parsers[parent].add_subparsers(
                dest="_".join([*parent.split(), "command"]),
                metavar="ACTION" if parent else "COMMAND",
                required=bool(parent),
            )
        parsers[command] = subparsers[parent].add_parser(word, help=help_text)
    for flag, where, kwargs in OPTIONS:
        for command in where:
            if any(parent in where for parent in _parents(command)):
                # Also taken before this subcommand: without a default here, a value typed
                # there is kept (argparse would overwrite it with this parser's default).
                parsers[command].add_argument(flag, **{**kwargs, "default": argparse.SUPPRESS})
            else:
                parsers[command].add_argument(flag, **kwargs)
    return parsers[""]


# --- settings ----------------------------------------------------------------------------------


def _open_existing(path: Path) -> StateDir | None:
    """The state dir if it exists (validated), without creating anything."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a path below a regular file
        raise StateError(f"cannot access state dir {path}: {exc.strerror}") from None
    return StateDir(path, create=False)


# Relay and egress flags apply to this run only: they are never saved into the state dir.
RUN_ONLY = (
    "allow", "deny", "tcp_buffer", "max_flows_per_peer", "udp_idle_timeout", "upstream_dns",
    "passthrough", "auto_passthrough", "max_conns_per_peer", "max_half_open_per_peer",
    "hello_timeout", "dns_tcp_idle_timeout", "silent_peer_after", "engine_thread", "fast_relay",
    "capture_bodies",
)  # fmt: skip


def _build_settings(
    state_dir: Path, saved: dict[str, Any], explicit: dict[str, Any], args: argparse.Namespace
) -> config.Settings:
    merged = {**saved, **explicit}  # none of them None
    if "address" in merged:
        merged["address"] = ipaddress.IPv4Interface(merged["address"])
    return config.Settings(
        state_dir=state_dir,
        json_events=bool(args.json),
        **{name: getattr(args, name) for name in RUN_ONLY},
        **merged,
    )


def _prepare(
    args: argparse.Namespace,
) -> tuple[Path, StateDir | None, dict[str, Any], config.Settings]:
    """Validate the state dir (if any) and the flags against it; nothing is written."""
    path = args.state_dir if args.state_dir is not None else config.default_state_dir()
    path = path.expanduser()
    existing = _open_existing(path)
    saved = existing.saved_settings() if existing is not None else {}
    explicit = {k: getattr(args, k) for k in SETTING_KEYS if getattr(args, k) is not None}
    if existing is not None and "address" in explicit:
        existing.check_address(ipaddress.IPv4Interface(explicit["address"]))
    settings = _build_settings(path, saved, explicit, args)
    return path, existing, explicit, settings


def _persist(state: StateDir, explicit: dict[str, Any]) -> None:
    if explicit:
        state.save_settings(**explicit)


# --- output helpers ----------------------------------------------------------------------------


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    seconds = max(0, int(now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover - loop always returns


def _peer_row(peer: PeerRecord, runtime: PeerRuntime | None) -> dict[str, Any]:
    """A peer as public data only (never its private or preshared key)."""
    return {
        "name": peer.name,
        "ip": peer.ip,
        "public_key": peer.public_key,
        "created": peer.created,
        "policy": peer.policy,
        "fallback": peer.fallback,
        **dataclasses.asdict(runtime or PeerRuntime()),
    }


def _policy_text(policy: str, fallback: str) -> str:
    return f"ask (else {fallback})" if policy == "ask" else policy


def _print_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    now = time.time()
    headers = ("NAME", "IP", "PUBLIC KEY", "POLICY", "ENDPOINT", "HANDSHAKE", "RX", "TX")
    cells = [
        (
            row["name"],
            row["ip"],
            row["public_key"],
            _policy_text(row["policy"], row["fallback"]),
            row["endpoint"] or "-",
            _ago(row["last_handshake"], now),
            _human_bytes(row["rx_bytes"]),
            _human_bytes(row["tx_bytes"]),
        )
        for row in rows
    ]
    _write_columns(headers, cells, out)


def _write_columns(headers: Sequence[str], cells: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]
    for line in (headers, *cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


def _print_config(text: str, qr: bool, out: TextIO) -> None:
    out.write(text)
    if qr:
        from unclaw_tui.qr import render_half_blocks  # qrcode loads only when asked for

        out.write("\n")
        out.write(render_half_blocks(text, ansi=out.isatty()))


# --- commands ----------------------------------------------------------------------------------


def _peer_config(state: StateDir, peer: PeerRecord, settings: config.Settings) -> str:
    endpoint = wgquick.resolve_endpoint(settings.endpoint, settings.listen_port)
    return wgquick.client_config(
        peer, state.identity().public_key, endpoint, str(settings.gateway_ip)
    )


def _cmd_peer_add(args: argparse.Namespace, out: TextIO) -> int:
    path, existing, explicit, settings = _prepare(args)
    if args.ip is not None:
        validate_peer_ip(args.ip, settings.tunnel_network, settings.gateway_ip)
    if existing is not None:
        # add_peer checks again under the lock; checking here first keeps a failing add from
        # touching the dir at all (not even creating the lock file).
        existing.check_new_peer(args.name, args.ip, settings.tunnel_network, settings.gateway_ip)
    state = existing or StateDir(path)
    peer = state.add_peer(
        args.name,
        args.ip,
        settings.tunnel_network,
        settings.gateway_ip,
        policy=args.policy or "allow",
        fallback=args.fallback or "deny",
    )
    _persist(state, explicit)
    _print_config(_peer_config(state, peer, settings), args.qr, out)
    return 0


def _cmd_peer_list(args: argparse.Namespace, out: TextIO) -> int:
    path, existing, explicit, _settings = _prepare(args)
    if existing is None and explicit:
        existing = StateDir(path)
    peers = existing.peers() if existing is not None else []
    stats = existing.read_stats() if existing is not None else {}
    if existing is not None:
        _persist(existing, explicit)
    rows = [_peer_row(p, stats.get(p.public_key)) for p in peers]
    if args.json:
        out.write(json.dumps(rows, indent=2) + "\n")
    else:
        _print_table(rows, out)
    return 0


def _prepare_peer(
    args: argparse.Namespace,
) -> tuple[StateDir, dict[str, Any], config.Settings, PeerRecord]:
    """`_prepare`, and the peer named (unknown: KeyError before anything is written)."""
    _path, existing, explicit, settings = _prepare(args)
    if existing is None:
        raise KeyError(f"unknown peer {args.name!r}")
    return existing, explicit, settings, existing.peer(args.name)


def _cmd_peer_show(args: argparse.Namespace, out: TextIO) -> int:
    existing, explicit, settings, peer = _prepare_peer(args)
    text = _peer_config(existing, peer, settings)
    if args.png is not None:
        from unclaw_tui.qr import save_png

        try:
            save_png(text, args.png)
        except OSError as exc:
            raise UsageError(f"cannot write {args.png}: {exc.strerror or exc}") from None
    _persist(existing, explicit)
    _print_config(text, args.qr, out)
    return 0


def _cmd_peer_remove(args: argparse.Namespace, out: TextIO) -> int:
    existing, explicit, _settings, _peer = _prepare_peer(args)
    _persist(existing, explicit)
    removed = existing.remove_peer(args.name)
    out.write(f"removed peer {removed.name} ({removed.ip})\n")
    return 0


def _cmd_ca(args: argparse.Namespace, out: TextIO) -> int:
    """The TLS interception CA, made in the state dir if it has none yet."""
    from unclaw_tui.services.ca import CertificateAuthority  # cryptography: only on demand
    from unclaw_tui.services.ca_page import url_for

    path, existing, explicit, settings = _prepare(args)
    state = existing or StateDir(path)
    _persist(state, explicit)
    ca = CertificateAuthority.load_or_create(state.path)  # a CAError is a StateError
    assert ca.cert_path is not None
    if args.path:
        out.write(f"{ca.cert_path}\n")
        return 0
    out.write(ca.cert_pem.decode("ascii"))
    # The PEM alone on stdout (so `unclaw-tui ca > ca.pem` works); where it lives on stderr.
    sys.stderr.write(f"# {ca.cert_path}\n")
    page = url_for(str(settings.gateway_ip))
    sys.stderr.write(f"# devices connected to the gateway can fetch it from {page}\n")
    return 0


def _duration(seconds: float) -> str:
    """An uptime in its two largest units: "2d 0h", "3h 12m", "4m 5s", "9s"."""
    left = max(0, int(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for (unit, size), (next_unit, next_size) in itertools.pairwise(units):
        if left >= size:
            return f"{left // size}{unit} {left % size // next_size}{next_unit}"
    return f"{left}s"


def _print_status(state_dir: Path, result: dict[str, Any], out: TextIO) -> None:
    def get(key: str) -> Any:
        return result.get(key, "?")

    rows = (
        ("gateway", f"running on {state_dir} (pid {get('pid')})"),
        ("version", str(get("version"))),
        ("uptime", _duration(result["uptime"]) if _is_number(result.get("uptime")) else "?"),
        ("listen port", f"{get('listen_port')} (endpoint {get('endpoint')})"),
        ("public key", str(get("public_key"))),
        ("peers", f"{get('peers')} ({get('peers_online')} online)"),
        ("open flows", str(get("open_flows"))),
    )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        out.write(f"{label.ljust(width)}  {value}\n")
    if result.get("under_load"):
        out.write(f"{'':{width}}  UNDER LOAD (handshake flood: cookies required)\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """The running gateway's status, through its control socket."""
    from unclaw_tui.control.client import ClientError, ControlClient, GatewayNotRunning
    from unclaw_tui.control.protocol import ControlError

    given = [f"--{key.replace('_', '-')}" for key in SETTING_KEYS if getattr(args, key, None)]
    if given:
        raise UsageError(f"status takes no {given[0]}: it asks the running gateway")
    path = args.state_dir if args.state_dir is not None else config.default_state_dir()
    path = path.expanduser()
    try:
        with ControlClient.connect(path) as gateway:
            result = gateway.call("status")
    except GatewayNotRunning as exc:
        return _fail(str(exc), EXIT_NO_GATEWAY)
    except ClientError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except ControlError as exc:
        return _fail(f"the gateway answered: {exc.message} ({exc.code})", EXIT_FAILURE)
    if not isinstance(result, dict):
        return _fail(f"the gateway's status is not an object: {result!r:.80}", EXIT_FAILURE)
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        _print_status(path, result, out)
    return 0


# --- requests: what a running gateway saw inside intercepted TLS ---------------------------------


def _peer_key(path: Path, peer: str) -> str:
    """A peer's public key from its name (in the state dir) or the key itself."""
    state = _open_existing(path)
    if state is not None:
        for record in state.peers():
            if peer in (record.name, record.public_key):
                return record.public_key
    raise UsageError(f"unknown peer {peer!r}")


def _cmd_requests(args: argparse.Namespace, out: TextIO) -> int:
    """The running gateway's recent requests (masked), as a table, JSON lines or HAR."""
    from unclaw_tui.control.client import ClientError, ControlClient, GatewayNotRunning
    from unclaw_tui.control.protocol import ControlError
    from unclaw_tui.control.requests import fetch_all
    from unclaw_tui.services import har
    from unclaw_tui.state import write_atomic

    given = [f"--{key.replace('_', '-')}" for key in SETTING_KEYS if getattr(args, key, None)]
    if given:
        raise UsageError(f"requests takes no {given[0]}: it asks the running gateway")
    if args.har is not None and args.json:
        raise UsageError("--har and --json: choose one")
    path = args.state_dir if args.state_dir is not None else config.default_state_dir()
    path = path.expanduser()
    target = None if args.har in (None, "-") else Path(args.har).expanduser()
    if target is not None and not target.parent.is_dir():
        raise UsageError(f"--har: no directory {str(target.parent)!r}")
    peer = _peer_key(path, args.peer) if args.peer is not None else None
    try:
        with ControlClient.connect(path) as gateway:
            records, dropped = fetch_all(gateway.call, peer=peer, limit=args.limit)
    except GatewayNotRunning as exc:
        return _fail(str(exc), EXIT_NO_GATEWAY)
    except ClientError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except ControlError as exc:
        return _fail(f"the gateway answered: {exc.message} ({exc.code})", EXIT_FAILURE)
    if args.har is not None:
        text = har.dumps(records, comment=f"{PROG} requests from {path}")
        if target is None:
            out.write(text)
        else:
            write_atomic(target, text.encode())  # 0600: headers may say more than they should
        return 0
    if args.json:
        from unclaw_tui.control.requests import to_wire

        for record in records:
            out.write(json.dumps(to_wire(record)) + "\n")
        return 0
    _print_requests(records, out)
    if dropped:
        out.write(f"({dropped} older requests no longer kept by the gateway)\n")
    return 0


def _print_requests(records: list[Any], out: TextIO) -> None:
    headers = ("TIME", "PEER", "PROTO", "METHOD", "URL", "STATUS", "SIZE", "MS")
    cells = []
    for r in records:
        proto = "grpc" if r.grpc and r.protocol == "h2" else r.protocol
        status = "-" if r.status is None else str(r.status)
        if r.grpc_status is not None:
            status += f" grpc {r.grpc_status}"
        elif r.error:
            status += f" ({r.error})"
        cells.append((
            time.strftime("%H:%M:%S", time.localtime(r.started_at)), r.peer, proto, r.method,
            f"{r.authority}{r.path}"[:80], status, _human_bytes(r.response_bytes),
            f"{r.done_ms:.0f}",
        ))  # fmt: skip
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]
    for line in (headers, *cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


# --- policy commands (issue 14): peer set, rule add/list/remove/test, decide, prompts ---------
#
# Always and timed rules live in rules.json: the CLI writes it under the state lock whether or
# not a gateway runs (a running one reloads it within a second).  Once and restart rules, the
# built-in rules of a run's flags, hit counts of this run and prompts live in a running
# gateway's memory: those go through its control socket (control/commands.py).

MAX_PAGES = 10_000  # pages of a list from the gateway (rules.list, prompts.list), at most


class _GatewayFailed(Exception):
    """Asking the running gateway failed: the message and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _state_path(args: argparse.Namespace) -> Path:
    path = args.state_dir if args.state_dir is not None else config.default_state_dir()
    return Path(path).expanduser()


@contextlib.contextmanager
def _talking(why: str = "") -> Iterator[None]:
    """Control errors as _GatewayFailed: 3 when no gateway runs (after `why` one is needed),
    1 when it fails."""
    from unclaw_tui.control.client import ClientError, GatewayNotRunning
    from unclaw_tui.control.protocol import ControlError

    try:
        yield
    except GatewayNotRunning as exc:
        raise _GatewayFailed(f"{why}{exc}", EXIT_NO_GATEWAY) from None
    except ClientError as exc:
        raise _GatewayFailed(str(exc), EXIT_FAILURE) from None
    except ControlError as exc:
        raise _GatewayFailed(f"the gateway answered: {exc.message}", EXIT_FAILURE) from None


@contextlib.contextmanager
def _gateway(path: Path, *, required: bool, why: str = "") -> Iterator[Any]:
    """A ControlClient of the gateway running on path; None if none runs and not required."""
    from unclaw_tui.control.client import ControlClient, GatewayNotRunning

    with _talking(why):
        try:
            client = ControlClient.connect(path)
        except GatewayNotRunning:
            if required:
                raise
            client = None
        try:
            yield client
        finally:
            if client is not None:
                client.close()


def _call(client: Any, method: str, params: dict[str, Any] | None = None) -> Any:
    result = client.call(method, params or {})
    if not isinstance(result, dict):
        raise _GatewayFailed(f"the gateway's {method} answer is not an object", EXIT_FAILURE)
    return result


def _fetch_all(client: Any, method: str, key: str) -> list[dict[str, Any]]:
    """Every page of a list method."""
    items: list[dict[str, Any]] = []
    offset = 0
    for _ in range(MAX_PAGES):
        result = _call(client, method, {"offset": offset} if offset else {})
        page, following = result.get(key), result.get("next")
        if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
            raise _GatewayFailed(f"the gateway's {method} answer has no {key} list", EXIT_FAILURE)
        items.extend(page)
        if following is None:
            return items
        if not isinstance(following, int) or following <= offset:
            raise _GatewayFailed(f"the gateway's {method} pages do not move on", EXIT_FAILURE)
        offset = following
    raise _GatewayFailed(f"the gateway's {method} has more than {MAX_PAGES} pages", EXIT_FAILURE)


def _cmd_peer_set(args: argparse.Namespace, out: TextIO) -> int:
    if args.policy is None and args.fallback is None:
        raise UsageError("peer set: give --policy, --fallback or both")
    existing, explicit, _settings, _peer = _prepare_peer(args)
    _persist(existing, explicit)
    peer = existing.set_peer_policy(args.name, args.policy, args.fallback)
    out.write(f"peer {peer.name}: policy {peer.policy}, fallback {peer.fallback}\n")
    return 0


def _peer_exists(state: StateDir | None, who: str) -> None:
    """KeyError (exit 2) unless who is every peer, a public key, or a peer's name."""
    if who == "*" or len(who) == 44:  # a key may belong to a peer added later
        return
    if state is None:
        raise KeyError(f"unknown peer {who!r}")
    state.peer(who)


def _cmd_rule_add(args: argparse.Namespace, out: TextIO) -> int:
    from unclaw_tui.policy.rules import make_rule
    from unclaw_tui.policy.store import RuleStore

    path = _state_path(args)
    existing = _open_existing(path)
    who = args.peer or "*"
    _peer_exists(existing, who)
    duration: Duration = args.duration
    if duration.lifetime in (Lifetime.ONCE, Lifetime.RESTART):
        # Neither means anything outside a running gateway's memory.
        why = f"a {duration.lifetime} rule lives in a running gateway's memory: "
        with _gateway(path, required=True, why=why) as client:
            params = {"action": args.action, "target": args.target.text, "peer": who,
                      "proto": args.proto, "duration": str(duration), "note": args.note,
                      "by": "cli"}  # fmt: skip
            if args.port is not None:
                params["port"] = str(args.port)
            result = _call(client, "rule.add", params)
        out.write(f"{result.get('id')}\n")
        return 0
    rule = make_rule(
        args.action,
        args.target.text,
        now=time.time(),
        who=who,
        ports=None if args.port is None else str(args.port),
        proto=args.proto,
        duration=duration,
        note=args.note,
    )
    RuleStore(existing or StateDir(path)).add(rule)
    out.write(f"{rule.id}\n")
    return 0


def _file_rules(state: StateDir | None) -> list[dict[str, Any]]:
    """rules.json's rules with the hit counts of rule-hits.json."""
    from unclaw_tui.control.commands import rule_doc
    from unclaw_tui.policy.store import RuleStore

    if state is None:
        return []
    store = RuleStore(state)
    hits = store.load_hits().hits
    docs = []
    for rule in store.load():
        counted = hits.get(rule.id)
        docs.append(rule_doc(rule, counted.count if counted else 0, counted and counted.last))
    return docs


def _until(doc: dict[str, Any], now: float) -> str:
    expires = doc.get("expires")
    if not _is_number(expires):
        return str(doc.get("lifetime", "?"))
    if expires <= now:
        return "expired"
    return f"in {_duration(expires - now).replace(' 0s', '').replace(' 0m', '')}"


def _print_rules(rules: list[dict[str, Any]], out: TextIO) -> None:
    now = time.time()
    headers = ("ID", "ACTION", "TARGET", "PEER", "PORT", "PROTO", "UNTIL", "HITS", "LAST HIT",
               "NOTE")  # fmt: skip
    cells = [
        (
            str(doc.get("id")),
            str(doc.get("action")),
            str(doc.get("what")),
            "all" if doc.get("who") == "*" else str(doc.get("who")),
            str(doc.get("port")),
            str(doc.get("proto")),
            _until(doc, now),
            str(doc.get("hits", 0)),
            _ago(doc["last_hit"], now) if _is_number(doc.get("last_hit")) else "never",
            str(doc.get("note", "")),
        )
        for doc in rules
    ]
    _write_columns(headers, cells, out)


def _cmd_rule_list(args: argparse.Namespace, out: TextIO) -> int:
    path = _state_path(args)
    with _gateway(path, required=False) as client:
        if client is not None:
            rules = _fetch_all(client, "rules.list", "rules")
        else:
            rules = _file_rules(_open_existing(path))
    if args.json:
        out.write(json.dumps({"gateway": client is not None, "rules": rules}, indent=2) + "\n")
        return 0
    _print_rules(rules, out)
    if client is None:
        sys.stderr.write(
            f"# no gateway runs on {path}: these are {RULES_NAME}'s rules; a running gateway "
            "also shows its flags' built-in rules and its once and restart rules\n"
        )
    return 0


RULES_NAME = "rules.json"


def _builtin_message(rule_id: str, rules: list[dict[str, Any]]) -> str:
    for doc in rules:
        if doc.get("id") == rule_id and doc.get("builtin"):
            return (
                f"rule {rule_id} is built in: it comes from the gateway's flag "
                f"--{doc.get('action')} {doc.get('what')}; restart the gateway without it"
            )
    return (
        f"no rule {rule_id}: b1, b2, ... are the built-in rules of a running gateway's "
        "--allow, --deny and --passthrough flags (see `unclaw-tui rule list`)"
    )


def _cmd_rule_remove(args: argparse.Namespace, out: TextIO) -> int:
    from unclaw_tui.policy.rules import DEFAULT_RULE, validate_rule_id
    from unclaw_tui.policy.store import RuleStore

    rule_id = args.id.strip().lower()
    path = _state_path(args)
    if rule_id == DEFAULT_RULE:
        raise UsageError("'default' is no rule but each peer's policy: see `unclaw-tui peer set`")
    builtin = re.fullmatch(r"b[0-9]+", rule_id) is not None
    if not builtin:
        validate_rule_id(rule_id)  # ValueError: exit 2
    existing = _open_existing(path)
    if builtin:
        with _gateway(path, required=False) as client:
            rules = _fetch_all(client, "rules.list", "rules") if client is not None else []
        raise _GatewayFailed(_builtin_message(rule_id, rules), EXIT_FAILURE)
    if existing is not None:
        try:
            removed = RuleStore(existing).remove(rule_id)
        except KeyError:
            pass
        else:
            out.write(f"removed rule {removed.id} ({removed.action} {removed.target.text})\n")
            return 0
    # Not in the file: a once or restart rule of the running gateway, if any.
    with _gateway(path, required=False) as client:
        if client is None:
            raise _GatewayFailed(
                f"no rule {rule_id} in {path / RULES_NAME}, and no gateway runs on {path} "
                "(whose once and restart rules live in its memory)",
                EXIT_FAILURE,
            )
        result = _call(client, "rule.remove", {"id": rule_id, "by": "cli"})
    out.write(f"removed rule {result.get('id')} ({result.get('action')} {result.get('what')})\n")
    return 0


def _vip_hostname(state: StateDir | None, address: str) -> str | None:
    """The hostname our DNS gave this VIP, from vips.json (None: not a VIP)."""
    if state is None:
        return None
    try:
        doc = state.read_json("vips.json")
    except StateError:
        return None
    entries = doc.get("vips") if isinstance(doc, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and entry.get("ip") == address:
            hostname = entry.get("hostname")
            return hostname if isinstance(hostname, str) else None
    return None


def _find_peer_record(state: StateDir | None, who: str) -> PeerRecord:
    for record in state.peers() if state is not None else []:
        if who in (record.name, record.public_key):
            return record
    raise KeyError(f"unknown peer {who!r}")


def _cmd_rule_test(args: argparse.Namespace, out: TextIO) -> int:
    from unclaw_tui.policy.matcher import Policy
    from unclaw_tui.policy.store import RuleStore
    from unclaw_tui.policy.targets import TargetKind
    from unclaw_tui.policy.verdict_for import FlowQuery, describe_verdict, verdict_for

    target, port = args.target
    if target.kind is TargetKind.GLOB:
        raise UsageError(f"{target.text} is a glob: test one name, e.g. www.{target.suffix}")
    if target.kind is TargetKind.NET and target.network.prefixlen != target.network.max_prefixlen:
        raise UsageError(f"{target.text} is a network: test one address of it")
    path = _state_path(args)
    state = _open_existing(path)
    hostname = target.text if target.kind is TargetKind.HOST else None
    address = None if hostname is not None else target.text
    vip = None
    if address is not None:
        vip = _vip_hostname(state, address)
        if vip is not None:
            # A VIP stands for its hostname; the real address is known only once resolved.
            hostname, address = vip, None
    with _gateway(path, required=False) as client:
        if client is not None:
            result = _call(client, "rule.test", {"peer": args.peer, "hostname": hostname,
                           "address": address, "port": port, "proto": args.proto})  # fmt: skip
        else:
            peer = _find_peer_record(state, args.peer)
            policy = Policy(RuleStore(state).load() if state is not None else [])
            query = FlowQuery(hostname, address, port, args.proto)
            result = verdict_for(policy, peer, query, time.time())
    result["gateway"] = client is not None
    if vip is not None:
        result["vip"] = target.text
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
        return 0
    query = FlowQuery(hostname, address, port, args.proto)
    out.write(f"{result.get('peer')} -> {query.describe()}")
    out.write(f"  (VIP {target.text})\n" if vip is not None else "\n")
    for line in describe_verdict(result):
        out.write(line + "\n")
    if client is None:
        sys.stderr.write(
            f"# no gateway runs on {path}: judged by {RULES_NAME} alone (a running gateway "
            "also counts its flags' built-in rules and its once and restart rules)\n"
        )
    return 0


_PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _cmd_decide(args: argparse.Namespace, out: TextIO) -> int:
    if not _PROMPT_ID.fullmatch(args.id):
        raise UsageError(f"invalid prompt id {args.id!r} (see `unclaw-tui prompts`)")
    path = _state_path(args)
    with _gateway(path, required=True) as client:
        params = {"id": args.id, "access": args.answer, "duration": str(args.duration),
                  "scope": args.scope, "by": "cli"}  # fmt: skip
        result = _call(client, "prompt.answer", params)
    rule_id = result.get("rule")
    if rule_id is None:
        out.write(f"prompt {args.id}: {args.answer} once\n")
    else:
        out.write(
            f"prompt {args.id}: {args.answer}, rule {rule_id} ({args.duration}, {args.scope})\n"
        )
    return 0


def _print_prompts(prompts: list[dict[str, Any]], out: TextIO) -> None:
    now = time.time()
    headers = ("ID", "PEER", "DESTINATION", "PROTO", "ROUTE", "WAITING", "OPENED", "FALLBACK IN")
    cells = []
    for doc in prompts:
        ip, port = str(doc.get("dst_ip")), doc.get("dst_port")
        where = f"[{ip}]" if ":" in ip else ip
        if doc.get("hostname"):
            where = f"{doc['hostname']} ({ip})"
        deadline = doc.get("deadline")
        left = _duration(deadline - now) if _is_number(deadline) and deadline > now else "now"
        cells.append((
            str(doc.get("id")), str(doc.get("peer")), f"{where}:{port}", str(doc.get("proto")),
            str(doc.get("route")), str(doc.get("waiting")),
            _ago(doc["opened"], now) if _is_number(doc.get("opened")) else "?", left,
        ))  # fmt: skip
    _write_columns(headers, cells, out)


def _cmd_prompts(args: argparse.Namespace, out: TextIO) -> int:
    path = _state_path(args)
    with _gateway(path, required=True) as client:
        prompts = _fetch_all(client, "prompts.list", "prompts")
    if args.json:
        out.write(json.dumps({"prompts": prompts}, indent=2) + "\n")
    elif prompts:
        _print_prompts(prompts, out)
    else:
        out.write("no open prompts\n")
    return 0


def _cmd_rule(args: argparse.Namespace, out: TextIO) -> int:
    return RULE_COMMANDS[args.rule_command](args, out)


RULE_COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "add": _cmd_rule_add,
    "list": _cmd_rule_list,
    "remove": _cmd_rule_remove,
    "test": _cmd_rule_test,
}
POLICY_COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "rule": _cmd_rule,
    "decide": _cmd_decide,
    "prompts": _cmd_prompts,
}


def _prepare_run(args: argparse.Namespace) -> tuple[config.Settings, Callable[[], None]]:
    """Create/validate the state dir and identity; the settings, and what saves the explicit
    ones: called once the gateway has started, so a start that fails (the port is in use)
    saves nothing."""
    path, existing, explicit, settings = _prepare(args)
    state = existing or StateDir(path)
    state.identity()

    def started() -> None:
        try:
            _persist(state, explicit)
        except (StateError, ValueError) as exc:  # the gateway runs on; later runs lack them
            sys.stderr.write(f"{PROG}: warning: settings not saved: {exc}\n")

    return settings, started


PEER_COMMANDS = {
    "add": _cmd_peer_add,
    "list": _cmd_peer_list,
    "show": _cmd_peer_show,
    "remove": _cmd_peer_remove,
    "set": _cmd_peer_set,
}


def _fail(message: str, status: int = EXIT_USAGE) -> int:
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 3 no gateway running for a
    command that needs one, 1 the gateway failed)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    try:
        if args.command is None:
            settings, on_started = _prepare_run(args)
        elif args.command == "ca":
            return _cmd_ca(args, sys.stdout)
        elif args.command == "status":
            return _cmd_status(args, sys.stdout)
        elif args.command == "requests":
            return _cmd_requests(args, sys.stdout)
        elif args.command in POLICY_COMMANDS:
            return POLICY_COMMANDS[args.command](args, sys.stdout)
        else:
            return PEER_COMMANDS[args.peer_command](args, sys.stdout)
    except _GatewayFailed as exc:
        return _fail(str(exc), exc.status)
    except (UsageError, StateError, ValueError) as exc:
        return _fail(str(exc))
    except KeyError as exc:
        return _fail(str(exc.args[0]) if exc.args else "unknown key")
    except BrokenPipeError:
        # `unclaw-tui peer list | head`: the reader left; not an error worth a traceback.
        return 0
    # Errors inside the running gateway are bugs or runtime failures, not usage errors: they
    # keep their traceback.  Imported lazily so that peer commands stay fast and need no engine.
    try:
        if args.no_ui:
            from unclaw_tui.headless import run

            return run(settings, on_started)
        from unclaw_tui.app import run_app

        return run_app(settings, on_started)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
