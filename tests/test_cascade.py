"""The cascade (3d_lowres -> 3d_cascade_fullres) is refused at `fedfs init` and Federation.create,
with the reason (issue 16, item 6; docs/nnunet.md, Cascade)."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from fedfs.cli.app import main
from fedfs.errors import ConfigError
from fedfs.federation import Federation, config_from_key_dir
from fedfs.trust.signing import generate_keypair


@pytest.fixture
def keys(tmp_path):
    generate_keypair("agg", "aggregator", tmp_path / "keys")
    generate_keypair("A", "site", tmp_path / "keys")
    return tmp_path / "keys"


@pytest.mark.parametrize("configuration, reason", [("3d_lowres", "only the first stage of the cascade"),
                                                   ("3d_cascade_fullres", "predict_next_stage")])
def test_init_refuses_the_cascade_with_the_reason(tmp_path, keys, configuration, reason):
    r = CliRunner().invoke(main, ["init", str(tmp_path / "b"), "--sites", "A", "--keys", str(keys),
                                  "-c", configuration])
    assert r.exit_code != 0
    assert isinstance(r.exception, ConfigError) and reason in str(r.exception)
    assert "not supported in a federation" in str(r.exception) and "docs/nnunet.md" in str(r.exception)
    assert not (tmp_path / "b" / "federation.json").exists()
    with pytest.raises(ConfigError, match=reason):  # --custom-configuration does not let it through either
        config_from_key_dir(keys, ["A"], configuration=configuration, custom_configuration=True)


def test_federation_create_refuses_a_cascade_config_built_by_hand(tmp_path, keys):
    config, agg = config_from_key_dir(keys, ["A"], configuration="3d_fullres")
    Federation.create(str(tmp_path / "ok"), config, agg)  # 3d_fullres is fine
    with pytest.raises(ConfigError, match="3d_cascade_fullres.*predict_next_stage"):
        Federation.create(str(tmp_path / "b"), dataclasses.replace(config, configuration="3d_cascade_fullres"), agg)
    assert not (tmp_path / "b" / "federation.json").exists()
