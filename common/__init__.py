"""Shared by every role: wire format, policy, signing and attestation verification.

The enclave imports this package, so the measurement covers it (see
``sidecar.platform.measure``). Nothing here does I/O except ``common.amqp``.
"""
