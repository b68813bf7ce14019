"""sealedsum: attested private aggregation over RabbitMQ.

The libraries are ``sealedsum.producers`` (seal and publish records), ``sealedsum.consumers``
(verify releases), ``sealedsum.sidecar`` (the platform and the enclave) and
``sealedsum.common`` (what every role shares); ``sealedsum.commands`` is the ``sealedsum``
command on top of them.
"""

__version__ = "0.1.0"
