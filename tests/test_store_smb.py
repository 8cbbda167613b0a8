"""The conformance suite on a real Samba server (started by the tests on a loopback port)."""

from __future__ import annotations

import pytest

from store_conformance import StoreConformance


class TestSMB(StoreConformance):
    @pytest.fixture
    def url(self, smb_url):
        return smb_url

    @pytest.fixture
    def options(self, samba):
        return {"password": samba.password}
