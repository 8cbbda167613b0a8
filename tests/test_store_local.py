"""The conformance suite on a local folder (``path`` and ``file://`` URLs)."""

from __future__ import annotations

import pytest

from store_conformance import StoreConformance


class TestLocalPath(StoreConformance):
    @pytest.fixture
    def url(self, tmp_path):
        return str(tmp_path / "bucket")


class TestFileURL(StoreConformance):
    @pytest.fixture
    def url(self, tmp_path):
        return f"file://{tmp_path / 'bucket'}"
