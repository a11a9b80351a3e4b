"""pytest plugin: print each failure's traceback the moment the test fails.

``ci/gpu_check.sh`` loads it (``-p pytest_report_now``) because a run cut short by its time
limit never reaches pytest's final FAILURES section, and a lent GPU's minutes are too few
to run a suite twice to learn why a test failed.
"""

from __future__ import annotations


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        print(f"\n----- {report.nodeid} ({report.when}) failed -----\n{report.longreprtext}\n", flush=True)
