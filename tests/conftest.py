"""Shared fixtures: a real moto S3 server and a real Samba server, both on 127.0.0.1."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

pytest.register_assert_rewrite("fedfs.testing.store")

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 endpoint (moto's server) on a free loopback port; sets AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    server.stop()


@pytest.fixture
def s3_url(moto_endpoint):
    """A fresh, empty bucket URL on the moto server."""
    import boto3

    name = f"fedfs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}/fed"


@pytest.fixture(scope="session")
def samba(tmp_path_factory):
    """A real Samba server on a loopback port (fails, never skips, if Samba cannot run)."""
    from samba_server import samba_server

    with samba_server(tmp_path_factory.mktemp("samba")) as info:
        yield info


@pytest.fixture
def smb_url(samba):
    """A fresh folder on the test Samba share, and the options to reach it."""
    return f"{samba.url.rstrip('/')}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(tmp_path_factory) -> Path:
    """Keys for an aggregator and sites A, B, C (generated once per session)."""
    from fedfs.trust.signing import generate_keypair

    d = tmp_path_factory.getbasetemp() / "keys"
    if not (d / "agg.key").exists():
        generate_keypair("agg", "aggregator", d)
        for s in ("A", "B", "C"):
            generate_keypair(s, "site", d)
    return d
