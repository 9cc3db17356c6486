"""The `domain` scope of a prompt's answer: the registrable domain of a hostname, from the copy
of the Public Suffix List that the `publicsuffixlist` package ships (never downloaded at run
time; a newer list comes with a newer package).

The list's private section counts: `x.github.io` is its own domain, so answering "this domain"
for one GitHub Pages site does not open them all.
"""

from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList

from unclaw_tui.policy.targets import parse_hostname


@functools.cache
def _list() -> PublicSuffixList:
    return PublicSuffixList()  # parses the packaged list once (~50 ms)


def registrable_domain(hostname: str) -> str | None:
    """`api.example.co.uk` -> `example.co.uk`; None for a public suffix itself (`co.uk`) or a
    single label (`localhost`)."""
    name = parse_hostname(hostname)
    if "." not in name:
        return None
    domain = _list().privatesuffix(name)
    return None if domain is None else str(domain)


def domain_scope(hostname: str) -> tuple[str, ...]:
    """The targets of a `domain` scope: the registrable domain and a glob of everything below
    it, e.g. ("example.co.uk", "*.example.co.uk").  A name with no registrable domain gets
    only itself: a rule for a whole public suffix would be a rule for strangers."""
    name = parse_hostname(hostname)
    domain = registrable_domain(name)
    if domain is None:
        return (name,)
    return (domain, "*." + domain)
