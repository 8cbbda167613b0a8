"""Five folds (issue 16, item 3): `fedfs init --folds 0-4` makes one federation per fold with the same
settings; the folds' set-ups come out identical (the second fold onwards does not preprocess again),
and each site ends with nnU-Net's standard results folder, on which nnU-Net's own commands run
unchanged: nnUNetv2_find_best_configuration, nnUNetv2_predict -f 0 1 2 3 4, nnUNetv2_ensemble,
nnUNetv2_apply_postprocessing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedfs.cli.app import main
from fedfs.errors import ConfigError
from fedfs.federation import Federation, fold_url, parse_folds
from fedfs.nnunet.work import NnunetOptions, NnunetWork, settle_options
from fedfs.trust.signing import generate_keypair
from nnunet_tiny import DATASET, TINY, tiny_site

BIN = Path(sys.executable).parent


def test_parse_folds():
    assert parse_folds("0-4") == ["0", "1", "2", "3", "4"]
    assert parse_folds("0,2") == ["0", "2"] and parse_folds("all") == ["all"]
    for bad in ("5", "0,0", "", "x"):
        with pytest.raises(ConfigError, match="--folds"):
            parse_folds(bad)


def _keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    generate_keypair("agg", "aggregator", keys)
    generate_keypair("A", "site", keys)
    return keys


def test_init_folds_makes_one_federation_per_fold_and_sites_train_its_fold(tmp_path):
    keys, url = _keys(tmp_path), str(tmp_path / "b")
    r = CliRunner().invoke(main, ["init", url, "--sites", "A", "--keys", str(keys), "--folds", "0-4"])
    assert r.exit_code == 0, r.output
    configs = [Federation.open(fold_url(url, str(k))).config for k in range(5)]
    assert [c.fold for c in configs] == ["0", "1", "2", "3", "4"]
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("fold", "federation_id", "created")}  # noqa: E731
    assert all(strip(c) == strip(configs[0]) for c in configs)
    assert not (tmp_path / "b" / "federation.json").exists()
    assert settle_options(NnunetOptions(dataset="1"), configs[3]).fold == 3
    with pytest.raises(ConfigError, match="trains fold 3"):
        settle_options(NnunetOptions(dataset="1", fold=0), configs[3])
    one = CliRunner().invoke(main, ["init", str(tmp_path / "one"), "--sites", "A", "--keys", str(keys), "--folds", "all"])
    assert one.exit_code == 0 and Federation.open(str(tmp_path / "one")).config.fold == "all"


def _run(cmd: list[str], env: dict[str, str]) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{cmd[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


@pytest.mark.nnunet
def test_five_fold_federations_give_nnunets_results_folder(tmp_path_factory, tmp_path, monkeypatch):
    from fedfs.roles.aggregator import Aggregator

    with tiny_site(tmp_path_factory) as t:
        res = tmp_path / "results"
        monkeypatch.setenv("nnUNet_results", str(res))
        monkeypatch.setenv("nnUNet_n_proc_DA", "0")
        keys, url = _keys(tmp_path), str(tmp_path / "bucket")
        r = CliRunner().invoke(main, ["init", url, "--sites", "A", "--keys", str(keys), "--folds", "0-4",
                                      "--rounds", "1"])
        assert r.exit_code == 0, r.output
        digests = set()
        for k in range(5):  # each fold's federation, as `fedfs site run URL/fold_K` would run it
            fed = Federation.open(fold_url(url, str(k)))
            agg = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / f"w-agg-{k}")
            work = NnunetWork(NnunetOptions(dataset=str(DATASET), trainer=TINY, num_processes=1,
                                            num_processes_fingerprint=1, validation_processes=1,
                                            iterations_per_epoch=3, val_iterations=1))
            site = fed.as_party(keys / "A.key").site(work, tmp_path / f"w-A-{k}")
            try:
                for _ in range(20):
                    agg.step()
                    site.step()
                    if site.state.finished:
                        break
                assert site.state.finished, f"fold {k} did not finish"
                digests.add(site.state.plans_digest)
            finally:
                work.close()
        assert len(digests) == 1  # one set-up: the same plans for every fold
        model = res / t.site.dataset_name / f"{TINY}__nnUNetPlans__2d"
        for k in range(5):
            assert (model / f"fold_{k}" / "checkpoint_final.pth").is_file()
            assert (model / f"fold_{k}" / "validation" / "summary.json").is_file()

        env = {**os.environ, "nnUNet_n_proc_DA": "0"}
        _run([str(BIN / "nnUNetv2_find_best_configuration"), str(DATASET), "-c", "2d", "-tr", TINY,
              "-p", "nnUNetPlans", "-f", "0", "1", "2", "3", "4", "-np", "1"], env)
        crossval = model / "crossval_results_folds_0_1_2_3_4"  # the five folds' validation, merged
        assert (crossval / "summary.json").is_file()
        assert (res / t.site.dataset_name / "inference_instructions.txt").is_file()
        pp = crossval / "postprocessing.pkl"  # nnUNetv2_determine_postprocessing's result
        assert pp.is_file()
        predict = [str(BIN / "nnUNetv2_predict"), "-i", str(t.site.images_ts), "-d", str(DATASET), "-c", "2d",
                   "-tr", TINY, "-p", "nnUNetPlans", "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1"]
        _run(predict + ["-o", str(tmp_path / "p5"), "-f", "0", "1", "2", "3", "4"], env)
        _run(predict + ["-o", str(tmp_path / "p0"), "-f", "0"], env)
        _run([str(BIN / "nnUNetv2_ensemble"), "-i", str(tmp_path / "p5"), str(tmp_path / "p0"),
              "-o", str(tmp_path / "ens"), "-np", "1"], env)
        _run([str(BIN / "nnUNetv2_apply_postprocessing"), "-i", str(tmp_path / "ens"), "-o", str(tmp_path / "pp"),
              "-pp_pkl_file", str(pp), "-np", "1", "-plans_json", str(model / "plans.json"),
              "-dataset_json", str(model / "dataset.json")], env)
        cases = sorted(p.name for p in Path(t.site.labels_ts).glob("*.nii.gz"))
        for folder in ("p5", "ens", "pp"):
            assert sorted(p.name for p in (tmp_path / folder).glob("*.nii.gz")) == cases, folder
