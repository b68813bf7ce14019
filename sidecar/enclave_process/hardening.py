"""Process hardening the enclave applies to itself at start, and a report of what took effect.

Emulated isolation: these stop other processes of the same user from attaching a
debugger or reading memory through /proc, and keep keys out of core files. They do
not protect against root or the kernel, which real TEEs do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


def harden() -> dict:
    report: dict = {}
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as err:
        report["core_limit_error"] = str(err)
    report["core_limit"] = resource.getrlimit(resource.RLIMIT_CORE)[0]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        report["dumpable"] = bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
        report["no_new_privs"] = bool(libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))
    except (OSError, AttributeError) as err:
        report["prctl_error"] = str(err)
    report["hardened"] = report.get("core_limit") == 0 and report.get("dumpable") is False
    return report
