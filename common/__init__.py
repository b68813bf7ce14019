"""Shared by every role: wire format, policy, signing and attestation verification.

The enclave imports this package, so the measurement covers it (see
``sealedsum.sidecar.measurement``). Nothing here does I/O except ``sealedsum.common.amqp``.
"""
