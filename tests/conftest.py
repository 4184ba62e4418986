from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Deployment, make_deployment

# SR_TEST_EVENT_LOOP=uvloop: the in-process servers and clients of every test run on uvloop, the
# loop `serve` picks by default ([service] event_loop = "auto"); `make test` runs the protocol
# tier once more that way. Relays the tests start as processes take their configuration's choice.
if os.environ.get("SR_TEST_EVENT_LOOP") == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real dev PKI per test session (CA, server, sink, two tenants)."""
    root = tmp_path_factory.mktemp("pki")
    make_deployment(root)
    return root / "certs"


@pytest.fixture
def deployment(tmp_path: Path, pki_dir: Path) -> Iterator[Deployment]:
    yield make_deployment(tmp_path, pki_from=pki_dir)
