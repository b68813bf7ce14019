"""The measured enclave core. No pika here: bytes in, effects out (see ``service.Enclave``)."""
