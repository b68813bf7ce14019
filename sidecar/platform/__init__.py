"""The platform: the root of trust. Emulated here; one small interface (:class:`Platform`)
so that a hardware backend (Nitro, SEV-SNP, TDX) could take its place."""

from sealedsum.sidecar.platform.base import Platform

__all__ = ["Platform"]
