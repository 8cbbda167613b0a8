"""``fedfs demo`` (what ``make demo`` runs): a whole FFE federation on a local folder.

1. Synthetic 2D data for three heterogeneous hospitals (different intensity
   scales, spacings, noise, lesion shapes and case counts) plus held-out cases.
2. ``fedfs simulate``: the aggregator and three sites as separate processes
   sharing only a folder: census, merged fingerprint, identical plans, rounds.
3. ``fedfs export`` of each site's final model into an nnU-Net results folder,
   then nnU-Net's own ``nnUNetv2_predict`` on the held-out cases and nnU-Net's
   Dice per site.

The budget is CPU-sized (nnU-Net's default trainer with 10 iterations per
epoch); on 2 cores it takes a few minutes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["run_demo", "DEMO_ROUNDS", "DEMO_LOCAL_EPOCHS"]

DEMO_ROUNDS = 3
DEMO_LOCAL_EPOCHS = 4


def run_demo(workdir: str | None = None, echo: Callable[[str], None] | None = print, *,
             rounds: int = DEMO_ROUNDS, local_epochs: int = DEMO_LOCAL_EPOCHS, mode: str = "ffe",
             aggregation: str = "sync") -> dict[str, Any]:
    """Run the demo in ``workdir`` (a new temporary folder by default), saying each step through ``echo``;
    return a summary: the bucket, the final version, each site's held-out Dice and exported model folder."""
    from ..federation import Federation
    from .export import export_site_model
    from ..nnunet.inference import dice_per_case, predict_from_results
    from .simulate import SimulationSpec, nnunet_environment, simulate
    from ..testing.synthetic import make_federation

    say = echo or (lambda _m: None)
    root = Path(workdir or tempfile.mkdtemp(prefix="fedfs-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(root, {"nnUNet_def_n_proc": "1"})
    os.environ.update(env)
    say(f"fedfs demo in {root}")
    sites = make_federation(env["nnUNet_raw"], n_sites=3, base_id=501, test_root=root / "heldout")
    for s in sites:
        say(f"  {s.dataset_name}: {s.n_train} training + {s.n_test} held-out cases, spacing {s.style.spacing}, "
            f"intensity x{s.style.intensity_scale:g} +{s.style.intensity_offset:g}")
    names = {s.dataset_name.split("_", 1)[1]: s for s in sites}
    spec = SimulationSpec(datasets={n: str(s.dataset_id) for n, s in names.items()}, mode=mode, rounds=rounds,
                          local_epochs=local_epochs, aggregation=aggregation, trainer="nnUNetTrainerFedfsTiny",
                          final_validation=False)
    result = simulate(spec, workdir=root / "federation", env=env, echo=say)
    say("exporting each site's final model and predicting its held-out cases with nnUNetv2_predict ...")
    dice: dict[str, float] = {}
    exported: dict[str, str] = {}
    for name, s in sorted(names.items()):
        fed = Federation.open(result["bucket"], identity=Path(result["keys"]) / f"{name}.key")
        results_root = root / "export" / name / "nnUNet_results"
        folder = export_site_model(fed, name, str(s.dataset_id), results_root, trainer=spec.trainer,
                                   in_results=results_root)
        exported[name] = str(folder)
        pred = root / "predictions" / name
        predict_from_results(results_root, s.dataset_id, spec.configuration, s.images_ts, pred, fold=0,
                             trainer="nnUNetTrainer")
        per_case = dice_per_case(pred, s.labels_ts)
        values = [v for v in per_case.values() if v == v]
        dice[name] = round(sum(values) / len(values), 4) if values else float("nan")
        say(f"  {name}: Dice {dice[name]:.3f} over {len(per_case)} held-out cases (model in {folder})")
    summary = {"bucket": result["bucket"], "mode": mode, "aggregation": aggregation, "sites": sorted(names),
               "rounds": rounds, "local_epochs": local_epochs, "final_version": result["final_version"],
               "dice_per_site": dice, "exported": exported, "wall_s": result["wall_s"]}
    say(f"done: mean Dice {sum(dice.values()) / len(dice):.3f}; bucket {result['bucket']} "
        f"(try `fedfs status {result['bucket']}`)")
    return summary
