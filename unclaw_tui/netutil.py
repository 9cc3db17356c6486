"""This host's addresses: the primary IPv4 (for client configs) and all local addresses.

Linux answers come from /proc (no subprocess); elsewhere `ip -j addr` and the host name's
addresses are tried.  Nothing here sends a packet.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import socket
import subprocess
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# TEST-NET-1 (RFC 5737): routed like any other destination but never answered; connecting a
# UDP socket only asks the kernel for a route and source address, it sends nothing.
_PROBE_V4 = ("192.0.2.1", 9)

_FIB_TRIE = Path("/proc/net/fib_trie")
_IF_INET6 = Path("/proc/net/if_inet6")


def default_route_ipv4() -> str | None:
    """The source address the kernel would use for the default route, or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(_PROBE_V4)
        addr = sock.getsockname()[0]
        if addr and addr != "0.0.0.0":
            return str(addr)
    return None


def primary_ipv4() -> str:
    """Default-route source address; else the first non-loopback IPv4; else 127.0.0.1."""
    addr = default_route_ipv4()
    if addr is not None:
        return addr
    candidates = (
        a
        for a in host_addresses()
        if isinstance(a, ipaddress.IPv4Address) and not a.is_loopback and not a.is_link_local
    )
    return str(min(candidates, default="127.0.0.1"))


def _parse_fib_trie(text: str) -> set[IPAddress]:
    # Entries look like "|-- 10.0.0.5" followed by "/32 host LOCAL": a /32 LOCAL is one of our
    # addresses (a wider LOCAL such as 127.0.0.0/8 is a local range, the rest are routes).
    found: set[IPAddress] = set()
    last: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("|--"):
            last = line[3:].strip()
        elif last is not None and line.startswith("/32 ") and line.endswith("host LOCAL"):
            with contextlib.suppress(ValueError):
                found.add(ipaddress.IPv4Address(last))
    return found


def _parse_if_inet6(text: str) -> set[IPAddress]:
    # "fe800000000000000000000000000001 02 40 20 80 eth0": 32 hex digits, then index etc.
    found: set[IPAddress] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            with contextlib.suppress(ValueError):
                found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    return found


def _from_proc() -> set[IPAddress]:
    found: set[IPAddress] = set()
    with contextlib.suppress(OSError):
        found |= _parse_fib_trie(_FIB_TRIE.read_text())
    with contextlib.suppress(OSError):
        found |= _parse_if_inet6(_IF_INET6.read_text())
    return found


def _parse_ip_json(text: str) -> set[IPAddress]:
    found: set[IPAddress] = set()
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        for link in json.loads(text):
            for info in link.get("addr_info", []):
                with contextlib.suppress(ValueError):
                    # Link-local IPv6 may carry a "%scope"; the address part is what we need.
                    found.add(ipaddress.ip_address(str(info.get("local", "")).split("%")[0]))
    return found


def _from_ip_command() -> set[IPAddress]:
    ip = shutil.which("ip")
    if ip is None:
        return set()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [ip, "-j", "addr"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        return _parse_ip_json(out)
    return set()


def _from_hostname() -> set[IPAddress]:
    found: set[IPAddress] = set()
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            with contextlib.suppress(ValueError):
                found.add(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
    return found


def host_addresses() -> set[IPAddress]:
    """All IPv4 and IPv6 addresses configured on this host (loopback included)."""
    found = _from_proc() or _from_ip_command() or _from_hostname()
    found |= {ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")}
    route_src = default_route_ipv4()
    if route_src is not None:
        found.add(ipaddress.IPv4Address(route_src))
    return found
