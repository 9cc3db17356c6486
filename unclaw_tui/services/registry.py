"""Every service the gateway routes to, by route."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unclaw_tui.services import ca_page, dns, tls

if TYPE_CHECKING:
    from unclaw_tui.router import Route
    from unclaw_tui.services.base import GatewayServices, Service


def build(gateway: GatewayServices) -> dict[Route, Service]:
    services: dict[Route, Service] = {}
    services.update(dns.create(gateway))  # first: it sets gateway.resolver for the others
    services.update(tls.create(gateway))
    services.update(ca_page.create(gateway))
    return services
