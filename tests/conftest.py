from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Deployment, make_deployment


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real dev PKI per test session (CA, server, sink, two tenants)."""
    root = tmp_path_factory.mktemp("pki")
    make_deployment(root)
    return root / "certs"


@pytest.fixture
def deployment(tmp_path: Path, pki_dir: Path) -> Iterator[Deployment]:
    yield make_deployment(tmp_path, pki_from=pki_dir)
