"""A producer's Ed25519 identity key: created once, enrolled in the enclave's policy by
its public key, and used to sign every envelope inside the sealed box."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealedsum.common.errors import ConfigError
from sealedsum.common.wire import strict_json


def public_key_text(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes_raw()).decode("ascii")


def generate(path: Path) -> Ed25519PrivateKey:
    """Create a new identity key file (mode 0600); refuses to overwrite one."""
    key = Ed25519PrivateKey.generate()
    doc = {"version": 1, "ed25519_seed": base64.b64encode(key.private_bytes_raw()).decode(),
           "public_key": public_key_text(key)}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists already", hint="an identity key is created once; enroll its public key") from None
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    return key


def load(path: Path) -> Ed25519PrivateKey:
    try:
        doc = strict_json(path.read_text())
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(doc["ed25519_seed"]))
    except FileNotFoundError:
        raise ConfigError(f"identity file {path} does not exist",
                          hint="create one with `sealedsum producer keygen --out FILE` and enroll its key") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a sealedsum identity file") from err
