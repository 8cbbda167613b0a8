"""The conformance suite on a real S3 endpoint (moto's server on 127.0.0.1), and the S3 error table."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from fedfs.errors import Conflict, NotFound, StateUnknown, StoreError, StoreUnavailable
from fedfs.store.base import translate
from fedfs.testing.store import StoreTests


class TestS3(StoreTests):
    @pytest.fixture
    def url(self, s3_url):
        return s3_url


def test_s3_listing_is_one_request_per_page(s3_url, monkeypatch):
    """One ListObjectsV2 per page of keys (s3fs's find made 2 LISTs and a HEAD for a small folder), pages
    followed to the end, a sibling prefix (``p`` against ``pq``) and folder markers left out."""
    from fedfs.store import open_store

    store = open_store(s3_url)
    for key in ("p/a.json", "p/b.json", "p/sub/c.json", "p/sub/d.json", "p/e.json", "pq/x.json"):
        store.write_bytes(key, b"{}")
    store.fs.pipe_file(store._p("p/folder/"), b"")  # a zero-byte folder marker, as consoles create
    calls: list[str] = []
    real = store.fs.call_s3

    def counted(method, *args, **kwargs):
        calls.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(store.fs, "call_s3", counted)
    assert store.list("p") == ["p/a.json", "p/b.json", "p/e.json", "p/sub/c.json", "p/sub/d.json"]
    assert calls == ["list_objects_v2"]
    calls.clear()
    monkeypatch.setattr(store, "list_page", 2)
    assert store.list("p/") == ["p/a.json", "p/b.json", "p/e.json", "p/sub/c.json", "p/sub/d.json"]
    assert calls == ["list_objects_v2"] * 3  # 6 keys (the marker too) at 2 a page
    assert store.list("missing") == []


def _client_error(code: str, **extra: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} message", **extra}}, "PutObject")


def test_s3_error_table(s3_url):
    """botocore's classes and S3 error codes, also as s3fs re-raises them, map by class and code."""
    from s3fs.errors import translate_boto_error

    from fedfs.store import open_store

    store = open_store(s3_url)
    where = store.describe("k.json")
    # a 412 that does not name its condition: s3fs raises OSError(EINVAL) caused by the ClientError
    no_condition = translate_boto_error(_client_error("PreconditionFailed"))
    assert isinstance(no_condition, OSError) and no_condition.errno == errno.EINVAL
    cases = [
        (no_condition, True, Conflict, f"{where}: already exists"),
        (translate_boto_error(_client_error("PreconditionFailed", Condition="If-None-Match")), True, Conflict, None),
        (_client_error("NoSuchKey"), False, NotFound, f"{where}: not found"),
        (translate_boto_error(_client_error("AccessDenied")), True, StoreError,
         f"{where}: permission denied (AccessDenied message)"),
        (NoCredentialsError(), True, StoreUnavailable, f"{where}: NoCredentialsError: Unable to locate credentials"),
        (EndpointConnectionError(endpoint_url="http://x"), True, StateUnknown, None),
        (EndpointConnectionError(endpoint_url="http://x"), False, StoreUnavailable, None),
        (_client_error("AccessDenied"), False, StoreError, None),
        # 5xx and throttling: retried by the daemons (StoreUnavailable), unknown outcome for a write
        (translate_boto_error(_client_error("InternalError")), False, StoreUnavailable, None),
        (_client_error("SlowDown"), False, StoreUnavailable, None),
        (_client_error("ServiceUnavailable"), True, StateUnknown, None),
    ]
    for exc, writing, cls, message in cases:
        err = translate(store, exc, "k.json", writing=writing)
        assert type(err) is cls and err.key == "k.json", (exc, err)
        assert message is None or str(err) == message, str(err)
