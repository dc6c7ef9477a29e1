"""An HTTP server for the lab's daemons that starts at once inside a namespace."""

from __future__ import annotations

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


def start(address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> Server:
    """Serve in a daemon thread; returns once the socket listens."""
    server = Server(address, handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
