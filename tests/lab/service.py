"""The instance's tiny public service: answers every GET with the instance id."""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.lab.server import Server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--ready", type=Path, required=True)
    args = parser.parse_args()
    body = f"{args.instance_id}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = Server(("0.0.0.0", 80), Handler)
    args.ready.touch()
    server.serve_forever()


if __name__ == "__main__":
    main()
