"""The DNS responder: query bytes in, reply bytes out.  Pure core (no I/O).

INTERFACE STUB — being implemented; signatures are final.
"""

from __future__ import annotations

from dataclasses import dataclass

from discovery.dns.settings import DnsSettings
from discovery.registry import Registry


@dataclass(frozen=True, slots=True)
class ForwardQuery:
    """Returned by :meth:`Responder.respond` when the query must go to the recursors.

    The server adapter forwards `query` (the client's bytes, unchanged) and
    relays the upstream reply, or sends :meth:`Responder.servfail` on failure.
    """

    query: bytes


class Responder:
    """Answers queries for the zone from the registry's current snapshot."""

    def __init__(self, registry: Registry, settings: DnsSettings) -> None:
        self.registry = registry
        self.settings = settings

    def update_settings(self, settings: DnsSettings) -> None:
        """Swap settings (SIGHUP); queries in flight finish with the old ones."""
        self.settings = settings

    def respond(self, data: bytes, *, client: str, tcp: bool) -> bytes | ForwardQuery | None:
        """The reply to one DNS message, a ForwardQuery, or None to send nothing.

        `client` is the peer IP (for the recursion allow-list); `tcp` selects
        the TCP size limit instead of UDP/EDNS trimming.  Never raises: an
        internal error gives SERVFAIL.  None means drop (QR=1, shorter than a header).
        """
        raise NotImplementedError

    def servfail(self, data: bytes) -> bytes | None:
        """A SERVFAIL reply echoing `data`'s id and question, or None if it has no header."""
        raise NotImplementedError
