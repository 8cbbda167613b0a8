"""An S3-compatible object store (AWS, MinIO, Ceph RGW, moto) through s3fs.

Exclusive publish is one ``PUT`` with ``If-None-Match: *`` (s3fs ``pipe_file``
with ``mode="create"``): the server answers 412 when the key exists, which s3fs raises as
``FileExistsError``. S3 PUTs are atomic, so readers never see partial objects.

Endpoint and credentials come the standard way (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance
roles...) and storage options override them (``endpoint_url``, ``key``,
``secret``, ``profile``, ``client_kwargs``). Listing caches are off: the
bucket changes under us and a stale listing would hide new rounds.

Errors: s3fs already turns most ``ClientError`` codes into builtins
(``s3fs.errors.translate_boto_error``: ``NoSuchKey`` is ``FileNotFoundError``, ``AccessDenied``
``PermissionError``, a 412 to ``If-None-Match`` ``FileExistsError``), which the generic table
handles. :data:`S3_ERRORS` covers what it leaves: a ``PreconditionFailed`` from a server that
does not name the condition (s3fs then raises ``OSError(EINVAL)`` caused by the ClientError),
raw ClientErrors, and botocore's transport and credential exceptions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

from botocore import exceptions as boto

from .base import CHUNK, ErrorTable, Outcome, Rule, Store, too_large

__all__ = ["S3Store", "S3_ERRORS"]


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a ClientError, or of the ClientError s3fs translated into ``exc``."""
    for err in (exc, exc.__cause__):
        if isinstance(err, boto.ClientError):
            return str(err.response.get("Error", {}).get("Code", ""))
    return None


def _code_in(*codes: str) -> Callable[[BaseException], bool]:
    return lambda exc: s3_error_code(exc) in codes


#: S3 codes of a server that is failing or throttling (HTTP 500/503), not refusing.
_BUSY_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
               "RequestTimeout", "500", "503")

#: botocore/s3fs exceptions -> fedfs outcomes (tried before base.OS_ERRORS).
S3_ERRORS: ErrorTable = (
    Rule(Exception, Outcome.CONFLICT, when=_code_in("PreconditionFailed", "412")),
    Rule(Exception, Outcome.NOT_FOUND, when=_code_in("NoSuchKey", "NotFound", "404")),
    # a server error or throttling, after botocore's own retries: the daemons wait and retry
    Rule(Exception, Outcome.CONNECTION_LOST, when=_code_in(*_BUSY_CODES)),
    Rule((boto.NoCredentialsError, boto.PartialCredentialsError), Outcome.UNAVAILABLE),
    Rule((boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ProxyConnectionError,
          boto.ReadTimeoutError, boto.ConnectionClosedError), Outcome.CONNECTION_LOST),
)


#: s3fs.S3FileSystem's keyword arguments, fsspec's cache switches and ``profile`` (its session's):
#: anything else would reach aiobotocore's session as a bare TypeError.
S3_OPTIONS = frozenset({
    "anon", "endpoint_url", "key", "secret", "token", "use_ssl", "client_kwargs", "requester_pays",
    "default_block_size", "default_fill_cache", "default_cache_type", "version_aware", "config_kwargs",
    "s3_additional_kwargs", "session", "username", "password", "cache_regions", "max_concurrency",
    "fixed_upload_size", "profile", "use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache",
})


class S3Store(Store):
    """A bucket (and prefix) on an S3-compatible server, with an ``If-None-Match: *`` publish."""

    scheme = "s3"
    error_table = S3_ERRORS
    accepted_options = S3_OPTIONS
    kind = "an S3 bucket"
    list_page = 1000  # keys per ListObjectsV2 request (S3's maximum)

    def __init__(self, url: str, bucket_path: str, **options: Any) -> None:
        super().__init__(url)
        import s3fs  # deferred: keeps `fedfs --help` fast

        self.prefix = bucket_path.strip("/")
        opts = dict(options)
        endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
        if endpoint:
            client_kwargs.setdefault("endpoint_url", endpoint)
        opts.setdefault("use_listings_cache", False)
        opts.setdefault("skip_instance_cache", True)
        self.fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, **opts)
        self.endpoint = client_kwargs.get("endpoint_url", "AWS default")
        self.publish_mechanism = "If-None-Match: *"

    def _p(self, key: str) -> str:
        return f"{self.prefix}/{key}" if key else self.prefix

    def missing_root(self) -> str | None:
        """One HeadBucket: a missing bucket is named as such, not as a missing federation."""
        bucket = self.prefix.split("/", 1)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
            return None
        except Exception as exc:  # denied or unreachable: the caller's own error says enough
            if not isinstance(exc, FileNotFoundError) and s3_error_code(exc) not in ("NoSuchBucket", "NotFound", "404"):
                return None
        return f"s3://{bucket}: no such bucket at {self.endpoint} (a mistyped name or endpoint? create the bucket first)"

    def _read(self, key: str, max_size: int | None) -> bytes:
        if max_size is None:
            return self.fs.cat_file(self._p(key))
        data = self.fs.cat_file(self._p(key), start=0, end=max_size + 1)
        if len(data) > max_size:
            raise too_large(self, key, max_size)
        return data

    def _write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)

    def _publish(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data, mode="create")

    def _head(self, key: str) -> dict | None:
        """One HeadObject (s3fs's exists/info add a LIST on a miss to look for a folder)."""
        bucket, path, _ = self.fs.split_path(self._p(key))
        try:
            return self.fs.call_s3("head_object", Bucket=bucket, Key=path)
        except FileNotFoundError:
            return None

    def _exists(self, key: str) -> bool:
        return self._head(key) is not None

    def _list(self, prefix: str) -> list[str]:
        """ListObjectsV2 pages under the prefix: one request per 1,000 keys (s3fs's ``find``
        made 2 LISTs and a HEAD for one small folder)."""
        bucket, root, _ = self.fs.split_path(self.prefix)
        root = root.strip("/") + "/" if root.strip("/") else ""
        want = root + prefix.strip("/") + "/" if prefix.strip("/") else root
        keys: list[str] = []
        token = None
        while True:
            page = self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=want, MaxKeys=self.list_page,
                                   **({"ContinuationToken": token} if token else {}))
            keys += [o["Key"][len(root):] for o in page.get("Contents", ())
                     if o["Key"].startswith(root) and not o["Key"].endswith("/")]  # no folder markers
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return keys

    def _size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(self._p(key))
        return int(head["ContentLength"])

    def _delete(self, key: str) -> None:
        self.fs.rm_file(self._p(key))

    def _upload(self, key: str, local_path: str) -> None:
        self.fs.put_file(local_path, self._p(key))

    def _download(self, key: str, fh: BinaryIO) -> None:
        with self.fs.open(self._p(key), "rb", block_size=CHUNK) as src:
            while block := src.read(CHUNK):
                fh.write(block)
