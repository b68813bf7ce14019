"""Hostile input at the parsers, the verifiers and the enclave core (issue 4): one module per
target, the total in ``test_total.py``; the policy and the shared machinery are in
``tests/fuzzing.py``, the fixtures in ``conftest.py``."""
