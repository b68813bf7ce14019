"""The fuzz total (the policy: ``tests/fuzzing.py``): the fuzz modules together declare at
least ``MIN_TOTAL_CASES`` cases, and a session that ran every fuzz test ran exactly those.

``conftest.py`` moves this test to the end of the session; it imports every fuzz module
itself, so the declared total is checked whatever the command line or ``-k`` selected."""

from __future__ import annotations

import collections

from tests.fuzzing import (
    CASES,
    MIN_TOTAL_CASES,
    RAN,
    STARTED,
    fuzz_tests,
    parametrizations,
    planned_cases,
    slowest_gap,
)


def test_fuzz_total():
    """The fuzz modules declare at least 20,000 cases; every fuzz test that ran ran at most
    its own (each test checks that it ran exactly those); and when every one of them ran
    (all its parametrizations), they ran exactly the cases declared, at least 20,000."""
    tests = fuzz_tests()
    planned = planned_cases()
    undeclared = [key for key in tests if not key.endswith("::test_fuzz_total") and key not in planned]
    assert not undeclared, f"fuzz tests without @fuzz_test(N) are not counted: {undeclared}"
    assert sum(planned.values()) >= MIN_TOTAL_CASES, planned
    ran = collections.Counter(RAN)
    print(f"\nfuzz cases: {sum(ran.values())} run, {sum(planned.values())} declared by {len(planned)} fuzz tests; "
          f"{slowest_gap()}")
    for name, n in sorted(CASES.items()):
        print(f"  {name:45s} {n:6d}")
    assert set(ran) <= set(planned), set(ran) - set(planned)
    assert all(ran[key] <= n for key, n in planned.items()), {key: (ran[key], n) for key, n in planned.items()}
    if all(STARTED[key] == parametrizations(tests[key]) for key in planned):  # else: -k, or a file, left some out
        wrong = {key: (ran[key], n) for key, n in planned.items() if ran[key] != n}
        assert not wrong, f"cases run, declared: {wrong}"
        assert sum(ran.values()) == sum(planned.values()) >= MIN_TOTAL_CASES, dict(CASES)
