"""nnU-Net's ResEnc presets as federation settings (issue 16, item 2), on real nnU-Net (2D, 64x64, CPU).

The trap this guards against: ``-pl nnUNetPlannerResEncM`` writes ``nnUNetResEncUNetMPlans.json``; a
site that then built its trainer from ``-p nnUNetPlans`` found an older ``nnUNetPlans.json`` and trained
the default network while publishing the ResEnc plans' digest.
"""

from __future__ import annotations

import pytest

from fedfs.fl.plans import plans_digest
from fedfs.nnunet.network import bare_network
from fedfs.nnunet.work import NnunetOptions, NnunetWork
from nnunet_tiny import DATASET, TINY, default_plans, tiny_site

pytestmark = pytest.mark.nnunet
RESENC_M = "nnUNetPlannerResEncM"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with tiny_site(tmp_path_factory) as t:
        default_plans(t)  # the older nnUNetPlans.json the trap needs
        yield t


def _work(**kw) -> NnunetWork:
    return NnunetWork(NnunetOptions(dataset=str(DATASET), trainer=TINY, num_processes=1, num_processes_fingerprint=1,
                                    validate=False, **kw), mode="asym")


def test_a_resenc_site_with_an_older_default_plans_file_trains_the_resenc_network(site):
    # Prepare: nnUNetPlans.json (the default planner's) is already there
    assert (site.root / "pre" / site.site.dataset_name / "nnUNetPlans.json").is_file()
    work = _work(planner=RESENC_M)
    # Execute: plan with the ResEnc preset, then build the trainer as the site does
    identifier, summary, digest = work.plan(None)
    work.start(total_epochs=1)
    try:
        # Assert: the trainer holds the plans whose digest was published, and builds their network
        trainer = work.session.trainer
        assert identifier == "nnUNetResEncUNetMPlans"
        assert trainer.plans_manager.plans_name == identifier
        assert plans_digest(trainer.plans_manager.plans) == digest
        assert type(bare_network(trainer)).__name__ == "ResidualEncoderUNet"
    finally:
        work.close()


def test_the_planner_table_is_what_nnunet_derives():
    from fedfs.nnunet.adapter import planner_plans_identifier
    from fedfs.protocol.schema import PLANNERS

    assert {p: planner_plans_identifier(p) for p in PLANNERS} == PLANNERS


def test_init_stores_the_planner_and_its_plans_identifier_and_sites_are_held_to_them(tmp_path):
    from click.testing import CliRunner

    from fedfs.cli.app import main
    from fedfs.errors import ConfigError, SchemaError
    from fedfs.federation import Federation
    from fedfs.nnunet.work import settle_options
    from fedfs.protocol.schema import FederationConfig
    from fedfs.trust.signing import generate_keypair

    keys = tmp_path / "keys"
    generate_keypair("agg", "aggregator", keys)
    generate_keypair("A", "site", keys)
    r = CliRunner().invoke(main, ["init", str(tmp_path / "b"), "--sites", "A", "--keys", str(keys), "-pl", RESENC_M])
    assert r.exit_code == 0, r.output
    config = Federation.open(str(tmp_path / "b")).config
    assert (config.planner, config.plans_identifier) == (RESENC_M, "nnUNetResEncUNetMPlans")
    # the site takes the federation's planner and plans; contradicting options are refused
    o = settle_options(NnunetOptions(dataset="1"), config)
    assert (o.planner, o.plans) == (RESENC_M, "nnUNetResEncUNetMPlans")
    with pytest.raises(ConfigError, match="plans with nnUNetPlannerResEncM"):
        settle_options(NnunetOptions(dataset="1", planner="ExperimentPlanner"), config)
    with pytest.raises(ConfigError, match="trains the plans nnUNetResEncUNetMPlans"):
        settle_options(NnunetOptions(dataset="1", plans="nnUNetPlans"), config)
    # a federation.json naming another planner's plans for the ResEnc planner does not validate
    with pytest.raises(SchemaError, match="is what ExperimentPlanner writes"):
        FederationConfig.from_dict({**config.to_dict(), "plans_identifier": "nnUNetPlans"}, "federation.json")
    # an older federation.json without the fields: nnU-Net's defaults
    old = {k: v for k, v in config.to_dict().items() if k not in ("planner", "plans_identifier")}
    assert FederationConfig.from_dict(old, "federation.json").plans_name == "nnUNetPlans"


def _network_shapes(plans: dict, configuration: str = "2d") -> dict[str, tuple[int, ...]]:
    """The shapes of the network nnU-Net builds from ``plans`` (meta device: no memory)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    with torch.device("meta"):
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 2, allow_init=False,
                                     deep_supervision=True)
    shapes = {k: tuple(p.shape) for k, p in net.named_parameters()}
    shapes.update({k: tuple(b.shape) for k, b in net.named_buffers()})
    return shapes


def test_asym_aligns_resenc_networks_of_two_sites_with_different_plans(site, tmp_path_factory, capsys):
    """Two sites' own ResEncM plans (64x64 and 160x160 images: 5 and 6 stages); AsymFedAvg's
    resolution-level alignment shares every tensor of the smaller net, matching by name far fewer."""
    import json

    from fedfs.fl.align import sharing
    from fedfs.nnunet import adapter as nn
    from fedfs.testing import synthetic as syn

    big = syn.make_site(site.root / "raw", 772, "Big", n_train=3, n_test=0,
                        style=syn.SiteStyle(image_size=(160, 160), radius_mm=(20.0, 30.0)), seed=1)
    nn.local_fingerprint(big.dataset_id, num_processes=1)
    small = site.root / "pre" / site.site.dataset_name / "nnUNetResEncUNetMPlans.json"  # planned by the test above
    plans = {"small": json.loads(small.read_text()) if small.is_file() else nn.plan(DATASET, RESENC_M),
             "big": nn.plan(big.dataset_id, RESENC_M)}
    stages = {s: p["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"] for s, p in plans.items()}
    assert stages["small"] < stages["big"]
    shapes = {s: _network_shapes(p) for s, p in plans.items()}
    by_level, by_name = sharing(shapes, "level"), sharing(shapes, "name")
    frac = {s: (by_level[s].shared_params / by_level[s].params, by_name[s].shared_params / by_name[s].params)
            for s in shapes}
    with capsys.disabled():
        print(f"\nResEncM {stages}: shared params by level / by name: "
              + ", ".join(f"{s} {a:.3f} / {b:.3f} ({by_level[s].shared_tensors}/{by_level[s].tensors} tensors by "
                          f"level, {by_name[s].shared_tensors} by name)" for s, (a, b) in frac.items()))
    assert by_level["small"].shared_tensors == by_level["small"].tensors  # the whole smaller net
    assert by_name["small"].shared_tensors < by_level["small"].shared_tensors
    assert frac["big"][0] > frac["big"][1]


def test_a_resenc_federation_trains_exports_and_predicts(site, tmp_path, monkeypatch):
    """FFE with -pl nnUNetPlannerResEncM, one site, one round of 3 iterations; the exported model
    is a ResEnc model folder that nnUNetv2_predict_from_modelfolder runs."""
    from fedfs.federation import Federation, config_from_key_dir
    from fedfs.nnunet.inference import dice_per_case, predict_folder
    from fedfs.ops.export import export_site_model
    from fedfs.protocol import layout
    from fedfs.protocol.schema import PlansDocument
    from fedfs.roles.aggregator import Aggregator
    from fedfs.trust.signing import generate_keypair

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    keys, url = tmp_path / "keys", str(tmp_path / "bucket")
    generate_keypair("agg", "aggregator", keys)
    generate_keypair("A", "site", keys)
    config, agg_key = config_from_key_dir(keys, ["A"], mode="ffe", rounds=1, planner=RESENC_M)
    fed, _ = Federation.create(url, config, agg_key)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "w-agg")
    a = fed.as_party(keys / "A.key").site(
        NnunetWork(NnunetOptions(dataset=str(DATASET), trainer=TINY, num_processes=1, num_processes_fingerprint=1,
                                 validate=False, iterations_per_epoch=3, val_iterations=1)), tmp_path / "w-A")
    try:
        for _ in range(30):
            aggregator.step()
            if a.step().action == "finished" or a.state.finished:
                break
        assert a.state.finished, "the federation did not finish"
        assert type(bare_network(a.work.session.trainer)).__name__ == "ResidualEncoderUNet"
    finally:
        a.work.close()
    plans_doc = fed.bucket.read(layout.site_plans("A"), PlansDocument).doc
    assert plans_doc.plans_identifier == "nnUNetResEncUNetMPlans" and plans_doc.summary["planner"] == RESENC_M
    folder = export_site_model(fed, "A", str(DATASET), tmp_path / "model", trainer=TINY)
    import json

    assert json.loads((folder / "plans.json").read_text())["plans_name"] == "nnUNetResEncUNetMPlans"
    pred = predict_folder(folder, site.site.images_ts, tmp_path / "pred", env={"nnUNet_n_proc_DA": "0"})
    dice = dice_per_case(pred, site.site.labels_ts)
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 or d != d for d in dice.values())
