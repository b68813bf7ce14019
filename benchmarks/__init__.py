"""Benchmarks: what sealedsum's layers cost, next to plain pika on the same broker.

Run from the repository root::

    .venv/bin/python -m benchmarks            # default run, a few minutes on 2 cores
    .venv/bin/python -m benchmarks --quick    # under a minute

See ``benchmarks/README.md`` for what each figure means.
"""
