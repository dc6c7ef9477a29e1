"""Egress `direct`: no change on the host; the API is reachable as routed.

For an instance with a public IPv4 (it can already reach the API), in an `ipv6` network (EC2's
dual-stack endpoint over the internet gateway; `dualstack: true`), or with interface endpoints in the
VPC (the API's names resolve to private addresses in the VPC).
"""

from __future__ import annotations

import logging
import socket
import urllib.parse

from bootstrap.errors import TransientError

LOG = logging.getLogger(__name__)


class Direct:
    def __init__(self, *, dualstack: bool = False) -> None:
        self.dualstack = dualstack

    def prepare(self) -> None:
        """Nothing to change."""

    def before_call(self) -> None:
        """Nothing to put back."""

    def adopt(self, client: object) -> None:
        """With dual-stack, the EC2 endpoint must have an IPv6 address: without one there is no way out."""
        meta = getattr(client, "meta", None)
        config = getattr(meta, "config", None)
        if not (self.dualstack and getattr(config, "use_dualstack_endpoint", False)):
            return
        host = urllib.parse.urlsplit(str(getattr(meta, "endpoint_url", ""))).hostname or ""
        try:
            found = socket.getaddrinfo(host, 443, socket.AF_INET6, socket.SOCK_STREAM)
        except OSError as err:
            found = []
            reason = f"{type(err).__name__}: {err}"
        else:
            reason = "no AAAA record"
        if not found:
            raise TransientError(
                f"egress direct: the dual-stack EC2 endpoint {host} has no IPv6 address ({reason}); "
                "without a public IPv4 there is no other way to the API"
            )
        LOG.info("egress: %s resolves to %s (IPv6)", host, found[0][4][0])

    def undo(self) -> None:
        """Nothing to restore."""

    def plan_lines(self) -> list[str]:
        return ["would change nothing on the host: the API is reachable as routed"]
