"""Shared by every role: wire format, policy, signing, attestation verification, errors,
the broker topology and the reconnect policy.

The enclave process imports part of this package; what it imports is measured (see
``sealedsum.sidecar.measurement``). Nothing here does I/O except ``sealedsum.common.amqp``
(the broker edge) and ``config.load`` (reading the config file).
"""
