"""An HTTP server for the lab's daemons that starts at once inside a namespace."""

from __future__ import annotations

import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves its own name (socket.getfqdn): in a namespace with no DNS
        # that is a 10 s resolver timeout before the first request.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class Server6(Server):
    """The same on IPv6 only (IPV6_V6ONLY), so it shares its port with an IPv4 server."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def start(address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> Server:
    """Serve in a daemon thread (on IPv6 if the address is); returns once the socket listens."""
    server = (Server6 if ":" in address[0] else Server)(address, handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
