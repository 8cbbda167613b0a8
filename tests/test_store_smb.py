"""The conformance suite on a real Samba server (started by the tests on a loopback port)."""

from __future__ import annotations

import pytest

from fedfs.testing.store import StoreTests


class TestSMB(StoreTests):
    @pytest.fixture
    def url(self, smb_url):
        return smb_url

    @pytest.fixture
    def options(self, samba):
        return {"password": samba.password}
