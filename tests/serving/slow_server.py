"""Serve the slow fake model in its own process (the drain test sends it SIGTERM): binds a
free loopback port, prints `PORT <n>`, serves until drained, exits 0."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fakes import fake_model  # noqa: E402 - after the path is set

from bitsmith.serving.server import ServeOptions, make_server  # noqa: E402

if __name__ == "__main__":
    model, _ = fake_model(max_batch=2, delay=float(sys.argv[1]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server = make_server([model], ServeOptions(timeout_ms=60_000), log_level="info")
    server.run(sockets=[sock])
