"""unclaw-tui: a userspace WireGuard gateway with a live operator console."""

from __future__ import annotations


def version() -> str:
    """The installed package's version (0.1.0 when run from a source tree)."""
    from importlib import metadata

    try:
        return metadata.version("unclaw-tui")
    except metadata.PackageNotFoundError:
        return "0.1.0"
