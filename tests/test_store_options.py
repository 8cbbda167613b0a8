"""Newcomer traps at the bucket: a mistyped storage option, a missing bucket or folder.

A mistyped option used to reach s3fs (or aiobotocore's session) as a bare ``TypeError``; a
missing S3 bucket read as "no federation here; run fedfs init"; a read-only command on a
mistyped path created that folder.
"""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner

from fedfs.cli import main
from fedfs.errors import ConfigError, NotFound
from fedfs.federation import Federation
from fedfs.store import open_store


def test_unknown_s3_option_lists_the_valid_ones(moto_endpoint):
    with pytest.raises(ConfigError) as exc:
        open_store("s3://some-bucket/fed", {"endpoint": moto_endpoint})
    text = str(exc.value)
    assert "unknown storage option 'endpoint' (did you mean 'endpoint_url'?)" in text
    assert "an S3 bucket takes:" in text and "client_kwargs" in text and "profile" in text


def test_unknown_option_on_the_cli_is_a_config_error_not_a_type_error(moto_endpoint):
    result = CliRunner().invoke(main, ["status", "s3://some-bucket/fed", "-so", f"endpont_url={moto_endpoint}"])
    assert result.exit_code != 0
    assert not isinstance(result.exception, TypeError)
    assert isinstance(result.exception, ConfigError)
    assert "did you mean 'endpoint_url'?" in str(result.exception)


def test_folder_and_memory_buckets_take_no_options(tmp_path):
    with pytest.raises(ConfigError, match="a folder bucket takes no storage options"):
        open_store(str(tmp_path / "b"), {"endpoint_url": "x"})
    with pytest.raises(ConfigError, match="a memory bucket takes no storage options"):
        open_store("memory://x", {"colour": "blue"})


def test_smb_option_typo_has_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"'usernme' \(did you mean 'username'\?\).*an SMB bucket takes: encrypt"):
        open_store("smb://127.0.0.1/share/fed", {"usernme": "bob"})


def test_missing_s3_bucket_is_named_as_such(moto_endpoint):
    name = f"fedfs-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NotFound) as exc:
        Federation.open(f"s3://{name}/fed")
    assert f"s3://{name}: no such bucket at {moto_endpoint}" in str(exc.value)
    assert "fedfs init" not in str(exc.value)


def test_existing_empty_s3_bucket_still_says_no_federation(s3_url):
    with pytest.raises(NotFound, match="no federation here; run `fedfs init` first"):
        Federation.open(s3_url)


@pytest.mark.parametrize("command", [["status"], ["report", "-o", "{out}"], ["bundle", "export", "--for", "A", "--key", "{out}", "-o", "{out}"]])
def test_read_only_commands_create_nothing(tmp_path, command):
    """`status`, `report` and `bundle export --for` on a mistyped path name the folder and leave no trace."""
    typo = tmp_path / "buckt" / "fed"
    args = [a.replace("{out}", str(tmp_path / "r.html")) for a in command]
    result = CliRunner().invoke(main, [*args, str(typo)])
    assert isinstance(result.exception, NotFound), result.output
    assert f"{typo}: no such folder" in str(result.exception)
    assert not (tmp_path / "buckt").exists()


def test_an_existing_folder_without_federation_says_run_init(tmp_path):
    with pytest.raises(NotFound, match="no federation here"):
        Federation.open(str(tmp_path))
