"""Consumers: attest the enclave, then receive and verify its signed, noised releases."""
