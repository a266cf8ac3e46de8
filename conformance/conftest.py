"""Shared pytest fixtures: `gateway_factory` starts real gateways and, when a
test fails, copies each gateway's log to conformance/logs/ and prints its
tail into the failure report."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Gateway  # noqa: E402

LOGS = Path(__file__).resolve().parent / "logs"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def gateway_factory(request):
    made = []

    def make(protocols, **kw) -> Gateway:
        gw = Gateway(protocols, **kw)
        made.append(gw)
        return gw.start()

    yield make
    failed = any(
        getattr(request.node, "rep_" + w, None) is not None
        and getattr(request.node, "rep_" + w).failed
        for w in ("setup", "call")
    )
    for i, gw in enumerate(made):
        if failed:
            LOGS.mkdir(exist_ok=True)
            name = request.node.nodeid.replace("/", "_").replace("::", "__")
            (LOGS / f"{name}.{i}.log").write_text(gw.log())
            print(f"---- manifold log ({gw.log_path}) ----\n{gw.log()[-8000:]}")
        gw.cleanup()
