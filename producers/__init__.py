"""Producers: attest the enclave, then seal and publish records to it."""
