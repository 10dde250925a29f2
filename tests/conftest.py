"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import pytest

from tests.certs import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test CA, server, client, expired and unrelated certificates (made once per session)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
