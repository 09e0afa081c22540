"""Start a private redis-server on a free port in its own directory (local stack, tests)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from flexlb.ports import free_port, free_port_pair
from flexlb.stack.processes import stop_process

__all__ = ["EmbeddedRedis", "RedisNotInstalled", "free_port", "free_port_pair"]


class RedisNotInstalled(RuntimeError):
    pass


class EmbeddedRedis:
    """A redis-server child process. ``persist=True`` keeps an append-only file so a restart keeps the data."""

    def __init__(self, port: int | None = None, *, persist: bool = False, directory: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotInstalled(
                "redis-server is not on PATH: install it (Debian/Ubuntu: apt-get install -y redis-server) "
                "or set REDIS_URL to a running Redis"
            )
        self.binary = binary
        self.port = port or free_port()
        self.persist = persist
        self._owns_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="flexlb-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "always",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode} on port {self.port}:\n{log}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout_s}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM; an append-only file, if any, is already fsynced)."""
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._owns_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.directory)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
