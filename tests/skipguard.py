"""A pytest plugin: a run with a skip this machine did not need fails.

Every skip is listed with its reason in the terminal summary (so `-rs` is not
needed), and any skip whose reason does not start with a line of the allow-list
file turns a passing run into a failing one.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def allowed(path: Path) -> list[str]:
    lines = (ln.strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def reason_of(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


class SkipGuard:
    def __init__(self, allow_list: Path):
        self.allow_list = allow_list
        self.skips: list[tuple[str, str]] = []  # (test id, reason)

    def not_allowed(self) -> list[tuple[str, str]]:
        prefixes = allowed(self.allow_list)
        return [(test, why) for test, why in self.skips if not any(why.startswith(p) for p in prefixes)]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips.append((report.nodeid, reason_of(report)))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.not_allowed() and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.skips:
            return
        tr = terminalreporter
        tr.section("skips")
        for test, why in self.skips:
            tr.line(f"SKIPPED {test}: {why}")
        bad = self.not_allowed()
        if bad:
            tr.line(
                f"{len(bad)} skip(s) not in {self.allow_list.name}: this machine can run them, so the run fails "
                "(install what they name, or fix the check that skipped them)",
                red=True,
                bold=True,
            )
