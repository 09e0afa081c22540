"""Private Redis deployments of several processes on free ports (tests, local trials): a Redis Cluster of N masters
and a primary/replica pair watched by a sentinel. Started with the redis-server and redis-cli binaries on PATH."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from flexlb.embedded_redis import RedisNotInstalled, free_port
from flexlb.stack.processes import stop_process


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RedisNotInstalled(f"{name} is not on PATH (Debian/Ubuntu: apt-get install -y redis-server redis-tools)")
    return path


def _free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536:
            with contextlib.suppress(OSError), socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
                return port
    raise OSError("no free port pair P, P + 10000")


def wait_for(check: Callable[[], object], what: str, timeout_s: float = 15.0) -> object:
    """Poll ``check`` (exceptions count as not yet) until it is truthy; fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (redis.RedisError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.02)
    raise TimeoutError(f"{what}: not within {timeout_s}s (last: {last!r})")


class _Servers:
    def __init__(self, directory: str | None) -> None:
        self.server = _binary("redis-server")
        self._owns_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="flexlb-redis-topology-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, port: int, *args: str) -> None:
        folder = self.directory / str(port)
        folder.mkdir(exist_ok=True)
        command = [self.server, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
        command += ["--logfile", str(folder / "redis.log")]
        self.processes[port] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.client(port).ping(), f"redis-server on port {port} answers PING")

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)

    def kill(self, port: int) -> None:
        process = self.processes.pop(port, None)
        if process is not None:
            stop_process(process)

    def close(self) -> None:
        for port in list(self.processes):
            self.kill(port)
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)


class EmbeddedCluster(_Servers):
    """``masters`` cluster-enabled redis-servers joined by ``redis-cli --cluster create`` (no replicas)."""

    def __init__(
        self, masters: int = 3, *, directory: str | None = None, node_timeout_ms: int = 1000, full_coverage: bool = True
    ) -> None:
        super().__init__(directory)
        self.cli = _binary("redis-cli")
        self.ports = [_free_cluster_port() for _ in range(masters)]
        self.node_timeout_ms = node_timeout_ms
        self.full_coverage = full_coverage  # False: a dead master takes only its own slots down

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> EmbeddedCluster:
        for port in self.ports:
            config = [
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
            ]
            config += ["--cluster-require-full-coverage", "yes" if self.full_coverage else "no"]
            self.spawn(port, "--cluster-enabled", "yes", *config, "--save", "", "--appendonly", "no")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run([self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
        for port in self.ports:
            wait_for(lambda p=port: self.client(p).execute_command("CLUSTER INFO")["cluster_state"] == "ok",
                     f"cluster node {port} reports cluster_state:ok")  # fmt: skip
        return self

    def owner(self, slot: int) -> int:
        """The port of the node that owns ``slot``, as the first node sees it."""
        for start, end, primary, *_ in self.client(self.ports[0]).execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise LookupError(f"slot {slot} is not covered")

    def node_id(self, port: int) -> str:
        return self.client(port).execute_command("CLUSTER MYID")

    def move_slot(self, slot: int, to_port: int, *, between: Callable[[], None] | None = None) -> int:
        """Reshard one slot by hand, as ``redis-cli --cluster reshard`` does: IMPORTING on the target, MIGRATING on
        the source, the keys over with MIGRATE (10 per call, as redis-cli's default pipeline), then SETSLOT NODE on
        every node. ``between`` runs after each MIGRATE (a test interleaves load). Returns the keys moved."""
        source = self.owner(slot)
        src, dst = self.client(source), self.client(to_port)
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", self.node_id(source))
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", self.node_id(to_port))
        moved = 0
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 10):
            src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            if between is not None:
                between()
        target = self.node_id(to_port)
        for port in (to_port, source, *(p for p in self.ports if p not in (source, to_port))):
            self.client(port).execute_command("CLUSTER SETSLOT", slot, "NODE", target)
        return moved


class EmbeddedSentinel(_Servers):
    """A primary, a replica of it and one sentinel (quorum 1) watching them as ``master_name``."""

    def __init__(self, master_name: str = "flexlb", *, directory: str | None = None) -> None:
        super().__init__(directory)
        self.master_name = master_name
        self.primary, self.replica, self.sentinel = free_port(), free_port(), free_port()

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{self.master_name}"

    def start(self) -> EmbeddedSentinel:
        plain = ("--save", "", "--appendonly", "no")
        self.spawn(self.primary, *plain)
        self.spawn(self.replica, *plain, "--replicaof", "127.0.0.1", str(self.primary))
        wait_for(lambda: self.client(self.replica).info("replication")["master_link_status"] == "up",
                 "the replica is in sync")  # fmt: skip
        folder = self.directory / str(self.sentinel)
        folder.mkdir(exist_ok=True)
        config = folder / "sentinel.conf"
        config.write_text(
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} 1000\n"
            f"sentinel failover-timeout {self.master_name} 5000\n"
        )
        self.spawn(self.sentinel, str(config), "--sentinel")
        wait_for(self._replica_known, "the sentinel knows the replica")
        return self

    def _replica_known(self) -> bool:
        replicas = self.client(self.sentinel).sentinel_slaves(self.master_name)
        return any(
            r.get("is_slave") and not r.get("is_sdown") and r.get("master-link-status") == "ok" for r in replicas
        )

    def primary_port(self) -> int:
        _, port = self.client(self.sentinel).execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)

    def failover(self, *, stop_primary: bool = False, timeout_s: float = 20.0) -> int:
        """SENTINEL FAILOVER (after stopping the primary, with ``stop_primary``) and wait until the other server is
        the primary, by the sentinel and by its role; a live old primary must be its replica too (until the
        sentinel reconfigures it, up to its 10 s INFO period, it still takes writes, which the failover loses).
        Returns the new primary's port."""
        old = self.primary_port()
        new = self.replica if old == self.primary else self.primary
        if stop_primary:
            self.kill(old)
        self.client(self.sentinel).execute_command("SENTINEL FAILOVER", self.master_name)

        def done() -> bool:
            promoted = self.primary_port() == new and self.client(new).info("replication")["role"] == "master"
            return promoted and (stop_primary or self.client(old).info("replication")["role"] == "slave")

        wait_for(done, f"port {new} promoted", timeout_s)
        return new
