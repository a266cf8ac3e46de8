"""One gateway per test module (tests use unique topics and client ids);
tests that restart or kill the gateway use `gateway_factory` instead."""

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import Gateway  # noqa: E402

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def gw(request):
    g = Gateway(["mqtt"], options={"mqtt": {"topic_scan_interval_ms": 200}}).start()
    yield g
    if request.session.testsfailed:
        logs = Path(__file__).resolve().parent.parent / "logs"
        logs.mkdir(exist_ok=True)
        (logs / f"mqtt-{request.module.__name__}.log").write_text(g.log())
    g.stop()
    g.cleanup()


@pytest.fixture
def uniq(request):
    """A unique prefix for topics and client ids of one test."""
    return f"t{next(_ids)}-{request.node.name.split('[')[0][-20:]}"
