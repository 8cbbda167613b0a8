"""Configuration typos are errors: unknown ``--config`` keys and ``FEDFS_*`` variables, with a did-you-mean.

Before, ``datset = "501"`` in a TOML file and ``FEDFS_NP=4`` in the environment were silently
ignored. docs/cli.md lists every option's variable and key.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedfs.cli import main
from fedfs.cli.strict import OTHER_VARIABLES, known_names
from fedfs.errors import ConfigError, ValidationError
from fedfs.federation import Federation, config_from_key_dir

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return main.main([str(a) for a in args], standalone_mode=False)


def toml(tmp_path, text, name="site.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("typo, meant", [("datset", "dataset"), ("devcie", "device"), ("np", "num_processes"),
                                         ("poll-intervall", "poll_interval")])
def test_an_unknown_toml_key_is_an_error_with_a_did_you_mean(tmp_path, typo, meant):
    path = toml(tmp_path, f'url = "{tmp_path / "b"}"\n{typo} = "x"\n')
    with pytest.raises(ConfigError) as err:
        cli("site", "run", "--config", path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: unknown key {typo!r} (did you mean {meant!r}?)")
    assert "`fedfs site run` takes" in msg and "dataset" in msg


def test_a_key_another_command_takes_is_accepted(tmp_path):
    # one site.toml for `site run` and `export`: watch and poll-interval are site run's, not export's
    path = toml(tmp_path, 'watch = "poll"\npoll-interval = 30\ndataset = "501"\ndevice = "cpu"\n')
    with pytest.raises(ConfigError, match="no bucket URL"):  # got past the keys
        cli("export", "--config", path, "-o", tmp_path / "out")
    with pytest.raises(ConfigError, match="no bucket URL"):  # status takes neither dataset nor key
        cli("status", "--config", path)


def test_keys_are_the_long_option_names_for_every_command(tmp_path, keys):
    # federation-digest reaches `status`, whose parameter is named differently in the code
    config, agg = config_from_key_dir(keys, ["A"])
    url = str(tmp_path / "bucket")
    Federation.create(url, config, agg)
    path = toml(tmp_path, f'url = "{url}"\nfederation-digest = "{"0" * 64}"\n')
    with pytest.raises(ValidationError, match="pinned"):
        cli("status", "--config", path)


def test_an_unknown_fedfs_variable_is_an_error_with_a_did_you_mean(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFS_NP", "4")
    with pytest.raises(ConfigError, match=r"unknown environment variable FEDFS_NP \(did you mean "
                                          r"'FEDFS_NUM_PROCESSES'\?\)"):
        cli("site", "step", tmp_path / "b")
    monkeypatch.delenv("FEDFS_NP")
    monkeypatch.setenv("FEDFS_DATSET", "501")
    with pytest.raises(ConfigError, match="did you mean 'FEDFS_DATASET'"):
        cli("status", tmp_path / "b")


def test_variables_read_elsewhere_are_allowed(tmp_path, monkeypatch):
    for var in OTHER_VARIABLES:
        monkeypatch.setenv(var, "")
    monkeypatch.setenv("FEDFS_NUM_PROCESSES", "2")  # another command's option: allowed here
    with pytest.raises(ConfigError, match="no bucket URL"):
        cli("aggregator", "step")


def test_every_fedfs_variable_the_code_reads_is_known():
    known = set(known_names(main).env.values())
    typo_examples = {ROOT / "fedfs" / "cli" / "strict.py", ROOT / "fedfs" / "cli" / "doc.py"}  # FEDFS_NP
    used = {m for p in (ROOT / "fedfs").rglob("*.py") if p not in typo_examples
            for m in re.findall(r"\bFEDFS_[A-Z0-9_]*[A-Z0-9]", p.read_text())}
    assert used - known == set(), "add these to fedfs.cli.strict.OTHER_VARIABLES (or make them options)"


def test_docs_list_each_options_variable_and_key():
    text = (ROOT / "docs" / "cli.md").read_text()
    assert "| `-np` | `FEDFS_NUM_PROCESSES` | `num_processes` |" in text
    assert "| `--federation-digest` | `FEDFS_FEDERATION_DIGEST` | `federation_digest` |" in text
    for var in OTHER_VARIABLES:
        assert f"| `{var}` |" in text


def test_the_example_config_files_use_only_known_keys():
    import tomllib

    known = {k for keys in known_names(main).keys for k in keys}
    for path in sorted((ROOT / "examples").rglob("*.toml")):
        data = tomllib.loads(path.read_text())
        assert {k.replace("-", "_") for k in data} <= known, path
