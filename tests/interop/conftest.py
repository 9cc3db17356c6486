"""Interop fixtures: real namespaces, real wireguard-go, the real gateway process.

Outside CI a machine without root or the tools skips these tests; in CI (CI=true) that is a
failure, so a broken runner can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.interop.harness import (
    FlowsSetup,
    GatewaySetup,
    make_flows_setup,
    missing_requirements,
    topology,
)


def _require_interop() -> None:
    missing = missing_requirements()
    if not missing:
        return
    reason = "interop requirements missing: " + ", ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)  # not CI: a developer laptop without root; CI=true fails above


@pytest.fixture
def wg_setup() -> Iterator[GatewaySetup]:
    _require_interop()
    with topology() as topo:
        client_ns = topo.namespace("c")
        gateway_ns = topo.namespace("g")
        topo.link(client_ns, "192.168.77.2/24", gateway_ns, "192.168.77.1/24")
        state_dir = topo.tmp / "state"
        yield GatewaySetup(topo, client_ns, gateway_ns, state_dir)


@pytest.fixture
def flows_setup() -> Iterator[FlowsSetup]:
    """client ns -> gateway ns -> internet ns (test servers at 198.18.0.2); see FlowsSetup."""
    _require_interop()
    if shutil.which("curl") is None:
        reason = "interop requirements missing: curl"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)  # not CI; CI=true fails above
    with topology() as topo:
        yield make_flows_setup(topo)
