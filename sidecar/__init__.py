"""The sidecar: an emulated TEE platform (parent process) and the enclave it measures and launches."""
