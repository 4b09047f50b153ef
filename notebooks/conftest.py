"""`make notebooks` ends with each notebook's wall time (the sum of its cells' run times under nbval)."""

from __future__ import annotations

from collections import defaultdict

_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    # with pytest-xdist the workers' reports are replayed here, on the controller
    if report.when == "call":
        _SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _SECONDS:
        return
    terminalreporter.write_sep("-", "notebook times (sum of cell run times)")
    for notebook in sorted(_SECONDS):
        terminalreporter.write_line(f"{notebook:<48} {_SECONDS[notebook]:7.1f} s")
    terminalreporter.write_line(f"{'total':<48} {sum(_SECONDS.values()):7.1f} s")
