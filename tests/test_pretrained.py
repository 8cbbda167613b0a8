"""Pretrained starting weights (issue 16, item 4): `fedfs init --pretrained-weights` takes an nnU-Net
checkpoint, a model folder or safetensors; the coordinator converts locally, the bucket holds
safetensors only, and v0 is the pretrained model after each site checked it against its plans."""

from __future__ import annotations

import pytest
import torch

from fedfs.errors import ConfigError, NnunetError
from fedfs.nnunet.pretrained import SEG_HEAD, apply_pretrained, read_pretrained, write_pretrained
from nnunet_tiny import DATASET, TINY, default_plans, tiny_site

pytestmark = pytest.mark.nnunet


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """nnU-Net's own checkpoint_final.pth of one tiny epoch (default plans), and its session's weights."""
    from fedfs.nnunet.training import NnunetSession

    with tiny_site(tmp_path_factory) as t:
        default_plans(t)
        res = tmp_path_factory.mktemp("pretrained_results")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("nnUNet_results", str(res))
            s = NnunetSession.create(DATASET, "2d", 0, TINY, total_epochs=1, env={"nnUNet_n_proc_DA": "0"})
            try:
                s.train_epochs(1)
                final = s.finish(validate=False).checkpoint_final
                weights = s.weights()
            finally:
                s.close()
        yield t, final, weights


def test_checkpoint_model_folder_and_safetensors_read_alike(pretrained, tmp_path):
    _, ckpt, weights = pretrained
    from_ckpt, meta = read_pretrained(ckpt)
    assert meta["format"] == "nnunet-checkpoint" and meta["trainer_name"] == TINY
    assert set(from_ckpt) == set(weights) and all(torch.equal(from_ckpt[k], weights[k]) for k in weights)
    from_folder, meta_f = read_pretrained(ckpt.parent.parent)  # Trainer__Plans__conf: an nnU-Net model folder
    assert meta_f["source"].endswith("fold_0/checkpoint_final.pth") and set(from_folder) == set(weights)
    write_pretrained(ckpt, tmp_path / "p.safetensors")
    from_st, _ = read_pretrained(tmp_path / "p.safetensors")
    assert all(torch.equal(from_st[k], weights[k]) for k in weights)
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="must be an nnU-Net checkpoint"):
        read_pretrained(tmp_path / "x.bin")
    evil = tmp_path / "evil.pth"  # a pickle that would run code: weights_only refuses it
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pickle ran",))

    evil.write_bytes(pickle.dumps({"network_weights": Boom()}))
    with pytest.raises(ConfigError, match="weights_only"):
        read_pretrained(evil)


def test_heads_of_another_label_count_are_skipped_and_other_mismatches_refused(pretrained):
    from fedfs.nnunet.training import NnunetSession

    t, _, weights = pretrained
    s = NnunetSession.create(DATASET, "2d", 0, TINY, total_epochs=1, env={"nnUNet_n_proc_DA": "0"})
    try:
        heads = [k for k in weights if SEG_HEAD in k]
        three_labels = {k: (torch.zeros((3,) + tuple(v.shape[1:])) if k in heads else v) for k, v in weights.items()}
        report = apply_pretrained(s.trainer, three_labels)
        assert report == {"loaded": len(weights) - len(heads), "skipped_heads": len(heads), "kept": len(heads)}
        assert all(torch.equal(s.weights()[k], weights[k]) for k in weights if k not in heads)
        body = next(k for k in weights if SEG_HEAD not in k and weights[k].ndim == 4)
        wrong = {**weights, body: torch.zeros(weights[body].shape[0] + 1, *weights[body].shape[1:])}
        with pytest.raises(NnunetError, match="do not fit this site's network"):
            apply_pretrained(s.trainer, wrong)
        assert apply_pretrained(s.trainer, wrong, partial=True)["kept"] == 1  # asym: what fits
    finally:
        s.close()


def test_init_with_pretrained_weights_makes_them_v0_and_the_bucket_holds_no_pickle(pretrained, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fedfs.cli.app import main
    from fedfs.federation import Federation
    from fedfs.nnunet.work import NnunetOptions, NnunetWork
    from fedfs.protocol import layout
    from fedfs.protocol.schema import GlobalManifest
    from fedfs.roles.aggregator import Aggregator
    from fedfs.trust.signing import generate_keypair
    from fedfs.weights.tensors import load_weights

    t, ckpt, weights = pretrained
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    keys, url = tmp_path / "keys", str(tmp_path / "bucket")
    generate_keypair("agg", "aggregator", keys)
    generate_keypair("A", "site", keys)
    args = ["init", url, "--sites", "A", "--keys", str(keys), "--rounds", "1", "--pretrained-weights", str(ckpt)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "already initialised" in CliRunner().invoke(main, args).output  # the same file: idempotent
    fed = Federation.open(url)
    ref = fed.config.pretrained_weights
    assert ref is not None and ref.key == layout.aggregator_blob(ref.sha256)
    agg = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "w-agg")
    site = fed.as_party(keys / "A.key").site(
        NnunetWork(NnunetOptions(dataset=str(DATASET), trainer=TINY, num_processes=1, num_processes_fingerprint=1,
                                 validate=False)), tmp_path / "w-A")
    try:
        for _ in range(10):
            agg.step()
            if fed.store.exists(layout.global_version(0)):
                break
            site.step()
        v0 = fed.bucket.read(layout.global_version(0), GlobalManifest).doc
        got, meta = load_weights(fed.bucket.get_blob_file(v0.blob, str(tmp_path / "v0.safetensors")))
        assert meta["pretrained"] == ref.sha256
        assert set(got) == set(weights) and all(torch.equal(got[k], weights[k]) for k in weights)
        assert site.work.pretrained_report["loaded"] == len(weights)
    finally:
        site.work.close()
    keys_in_bucket = fed.store.list("")
    assert not [k for k in keys_in_bucket if k.endswith((".pth", ".pt", ".pkl"))]
    for k in keys_in_bucket:
        if "/blobs/" in k:
            assert k.endswith(".safetensors"), k
