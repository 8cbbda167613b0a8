"""The conformance suite on a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pytest

from store_conformance import StoreConformance


class TestS3(StoreConformance):
    @pytest.fixture
    def url(self, s3_url):
        return s3_url
