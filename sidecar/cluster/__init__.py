"""Enclave replicas of one deployment (``[cluster]`` in the policy): what they send one
another (``sealedsum.sidecar.enclave.frames``), how a replica without keys gets them (:mod:`.join`), the work of
a replica on its shard of the records (:mod:`.worker`) and the broker edge (:mod:`.runtime`).
The release holder's part, merging increments, is the enclave core's
(:meth:`sealedsum.sidecar.enclave.service.Enclave.merge`)."""
