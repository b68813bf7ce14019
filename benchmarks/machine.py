"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pika


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = total
    return f"{usable}" if usable == total else f"{usable} usable of {total}"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def rabbitmq_version(url: str) -> str:
    """The version the broker announces on connect (the broker actually used), else
    ``rabbitmqctl version`` (the local node), else ``unknown``."""
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            props = conn._impl.server_properties or {}
        finally:
            conn.close()
        version = props.get("version")
        if isinstance(version, bytes):
            version = version.decode(errors="replace")
        if version:
            return f"{version} (announced by the broker)"
    except Exception:  # noqa: BLE001 - informational only
        pass
    if shutil.which("rabbitmqctl"):
        try:
            out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return f"{out.stdout.strip().splitlines()[-1]} (rabbitmqctl version)"
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def describe(url: str) -> dict:
    import phe.util

    return {
        "cpu": cpu_model(),
        "cores": cores(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "rabbitmq": rabbitmq_version(url),
        "gmpy2": bool(phe.util.HAVE_GMP),
        "loadavg_start": loadavg(),
    }
