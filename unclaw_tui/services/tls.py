"""Placeholder until the tls service lands: no routes, so its traffic goes to the relay."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unclaw_tui.router import Route
    from unclaw_tui.services.base import GatewayServices, Service


def create(gateway: GatewayServices) -> dict[Route, Service]:
    return {}
