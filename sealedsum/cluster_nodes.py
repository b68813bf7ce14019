"""The local three-node RabbitMQ cluster of ``deploy/cluster.sh``, for fault tests: stop a
node, start it again, ask whether it runs, and run ``rabbitmqctl`` against one node with the
cluster's Erlang cookie (which the script keeps; the caller's ``~/.erlang.cookie`` is not it).

Everything goes through the script, so that node names, ports, directories and the cookie
are decided in one place. ``$SEALEDSUM_CLUSTER_SCRIPT`` points at another copy of it;
``$SEALEDSUM_CLUSTER_DIR`` and the script's other variables pass through the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Mapping

from sealedsum.common.errors import BrokerAdminError

SCRIPT_ENV = "SEALEDSUM_CLUSTER_SCRIPT"
URLS_ENV = "SEALEDSUM_CLUSTER_URLS"
NODES = (1, 2, 3)
# The repository's script; an installed (non-editable) package has none.
DEFAULT_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "cluster.sh"
HINT = "is the cluster running? `deploy/cluster.sh status` tells, `deploy/cluster.sh start` starts it"


def script() -> Path:
    path = Path(os.environ.get(SCRIPT_ENV) or DEFAULT_SCRIPT)
    if not path.is_file():
        raise BrokerAdminError(f"the cluster script {path} does not exist",
                               hint=f"run from a checkout of the repository, or set ${SCRIPT_ENV}")
    return path


def urls_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """The cluster's AMQP URLs, node 1 first, from ``$SEALEDSUM_CLUSTER_URLS`` (comma-separated);
    empty when it is unset."""
    value = (os.environ if env is None else env).get(URLS_ENV, "")
    return [u.strip() for u in value.split(",") if u.strip()]


def _check(n: int) -> str:
    if n not in NODES:
        raise ValueError(f"node number must be 1, 2 or 3, not {n!r}")
    return str(n)


def run(*args: str, timeout: float = 180.0, check: bool = True) -> subprocess.CompletedProcess:
    """``deploy/cluster.sh ARGS...``; its output as text.

    :raises BrokerAdminError: it failed (with ``check``) or did not finish within ``timeout`` s.
    """
    try:
        result = subprocess.run(["bash", str(script()), *args], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise BrokerAdminError(f"`cluster.sh {' '.join(args)}` did not finish within {timeout:.0f} s", hint=HINT) from err
    if check and result.returncode != 0:
        detail = " ".join(line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip())
        raise BrokerAdminError(f"`cluster.sh {' '.join(args)}` failed (exit {result.returncode}): {detail[-600:]}",
                               hint=HINT)
    return result


def node_name(n: int) -> str:
    """Node ``n``'s Erlang node name, e.g. ``sealedsum-1@localhost``."""
    return run("name", _check(n)).stdout.strip()


def stop_node(n: int) -> None:
    """Stop node ``n`` (gracefully; the others keep running). A stopped node stays stopped."""
    run("stop-node", _check(n))


def start_node(n: int) -> None:
    """Start node ``n`` again; return once it runs and is back in the three-node cluster."""
    run("start-node", _check(n))


def node_running(n: int) -> bool:
    """Node ``n``'s rabbit application runs."""
    return run("running", _check(n), check=False, timeout=60).returncode == 0


def ctl(n: int, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``rabbitmqctl -q ARGS...`` against node ``n``, with the cluster's cookie."""
    return run("ctl", _check(n), "-q", *args, timeout=timeout)


def cluster_status(n: int) -> dict:
    """``rabbitmqctl cluster_status`` as node ``n`` reports it (``running_nodes``, ``disk_nodes``...)."""
    out = ctl(n, "cluster_status", "--formatter", "json").stdout.strip()
    try:
        doc = json.loads(out)
    except ValueError as err:
        raise BrokerAdminError(f"`rabbitmqctl cluster_status` on node {n} printed no JSON: {out[:200]!r}",
                               hint=HINT) from err
    if not isinstance(doc, dict):
        raise BrokerAdminError(f"`rabbitmqctl cluster_status` on node {n} printed {out[:200]!r}", hint=HINT)
    return doc


def running_nodes(n: int) -> set[str]:
    """The node names node ``n`` sees running in its cluster."""
    return set(cluster_status(n).get("running_nodes", []))
