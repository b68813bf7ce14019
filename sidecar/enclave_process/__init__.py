"""The enclave process around the measured core: its entry point (``python -m
sealedsum.sidecar.enclave_process``, started by the platform), broker runtime, sealed
store, state writer and hardening. Measured with the core (see ``sealedsum.sidecar.measurement``)."""
