"""The real servers the stack tier needs, as fixtures: the team stack (PostgreSQL, SeaweedFS's
S3 and an MLflow server, started by scripts/team.py on 127.0.0.1 in a temp dir) for each test
module that asks for it, stopped and removed by its own pids at the end."""

import pytest
from teamstack import ensure_tools, started_stack


@pytest.fixture(scope="module")
def tools():
    """What the stack runs on (pip packages, Debian's postgresql), installed where missing."""
    ensure_tools()


@pytest.fixture(scope="module")
def stack(tools, request):
    """A fresh stack for this test module: {dir, up, creds, state, uri, seconds}."""
    name = request.module.__name__.removeprefix("test_").replace("_", "-")
    with started_stack(f"vaepipe-{name}-") as s:
        yield s
