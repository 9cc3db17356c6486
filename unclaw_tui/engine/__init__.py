"""The data plane (C) and the WireGuard protocol (Python), with nothing of the router or UI."""
