"""The client in the internet: probes the Elastic IP continuously and logs every attempt.

A new attempt starts every INTERVAL whether or not the previous one finished, so a stalled
connection does not blind the probe; the log's first success after an outage is the client's view.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

from tests.lab import jsonl

# 20 ms resolution is finer than the figures it measures (hundreds of ms).
INTERVAL = 0.02
# Long enough for a loaded 2-core machine to answer; short enough to free threads quickly.
TIMEOUT = 0.5


def attempt(address: str, port: int, log: Path) -> None:
    started = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=TIMEOUT) as conn:
            conn.sendall(f"GET / HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        body = data.split(b"\r\n\r\n", 1)[-1].decode().strip()
        jsonl.append(log, {"started": started, "ok": data.startswith(b"HTTP/1.0 200"), "body": body})
    except OSError as error:
        jsonl.append(log, {"started": started, "ok": False, "error": type(error).__name__})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    while True:
        threading.Thread(target=attempt, args=(args.address, args.port, args.log), daemon=True).start()
        time.sleep(INTERVAL)


if __name__ == "__main__":
    main()
