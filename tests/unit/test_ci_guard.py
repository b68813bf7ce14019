"""In CI (SEALEDSUM_REQUIRE_BROKER=1) an integration test that skips is reported as failed:
issue 2 accepts a test suite only with no integration test skipped in CI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.integration import conftest as integration_conftest


def _report_after_hook(path: str, outcome: str, monkeypatch, require: str | None) -> pytest.TestReport:
    if require is None:
        monkeypatch.delenv("SEALEDSUM_REQUIRE_BROKER", raising=False)
    else:
        monkeypatch.setenv("SEALEDSUM_REQUIRE_BROKER", require)
    longrepr = (path, 3, "Skipped: no rabbitmqctl") if outcome == "skipped" else None
    report = pytest.TestReport(f"{path}::test_x", (path, 3, "test_x"), {}, outcome, longrepr, "call")
    hook = integration_conftest.pytest_runtest_makereport(SimpleNamespace(fspath=f"/repo/{path}"), None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(SimpleNamespace(get_result=lambda: report))
    return report


def test_a_skipped_integration_test_fails_in_ci(monkeypatch):
    report = _report_after_hook("tests/integration/test_publisher.py", "skipped", monkeypatch, "1")
    assert report.outcome == "failed"
    assert "SEALEDSUM_REQUIRE_BROKER=1" in str(report.longrepr) and "no rabbitmqctl" in str(report.longrepr)


@pytest.mark.parametrize("path, outcome, require", [
    ("tests/integration/test_publisher.py", "skipped", None),  # locally, without a broker: skips
    ("tests/integration/test_publisher.py", "skipped", "0"),
    ("tests/integration/test_publisher.py", "passed", "1"),
    ("tests/unit/fuzz/test_parsers.py", "skipped", "1"),  # unit tests are not the guard's business
])
def test_other_outcomes_are_left_alone(monkeypatch, path, outcome, require):
    assert _report_after_hook(path, outcome, monkeypatch, require).outcome == outcome
