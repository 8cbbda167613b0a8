"""A real nnU-Net federation stepped in one process: the roles the daemons run, without their processes.

The 3D, region and ignore-label tests use it: the aggregator and every site are built as the CLI
builds them (``Federation.aggregator``, ``Federation.site`` with :class:`NnunetWork`) and stepped
round-robin on a folder bucket until every site has finished. One process saves the start-up of
a Python with torch and nnU-Net per party (several seconds each on 2 busy cores); the process
version of the same steps is what tests/test_federation_nnunet.py runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedfs import layout
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import GlobalManifest
from fedfs.trust.signing import generate_keypair

TINY = "nnUNetTrainerFedfsTiny"


@dataclass
class SteppedFederation:
    fed: Federation
    keys: Path
    actions: list[str]
    sites: dict  # name -> Site

    def versions(self) -> list[GlobalManifest]:
        out, v = [], 0
        while self.fed.store.exists(layout.global_version(v)):
            out.append(self.fed.bucket.read(layout.global_version(v), GlobalManifest).doc)
            v += 1
        return out

    def party(self, name: str) -> Federation:
        return Federation.open(self.fed.store.url, identity=self.keys / f"{name}.key")


def step_federation(work: Path, datasets: Mapping[str, int], *, mode: str, configuration: str, rounds: int,
                    local_epochs: int = 1, iterations: int | None = None, val_iterations: int | None = None,
                    max_steps: int = 60) -> SteppedFederation:
    """Create a federation of ``datasets`` (site name -> nnU-Net dataset id) under ``work`` and step
    it to its final global. nnU-Net's folders come from the environment; training runs on the CPU
    without nnU-Net's final validation (it needs a ``__main__`` guard)."""
    from fedfs.nnunet.work import NnunetOptions, NnunetWork

    keys = work / "keys"
    generate_keypair("agg", "aggregator", keys)
    for s in datasets:
        generate_keypair(s, "site", keys)
    config, agg_identity = config_from_key_dir(keys, sorted(datasets), mode=mode, configuration=configuration,
                                               rounds=rounds, local_epochs=local_epochs)
    fed, _ = Federation.create(str(work / "bucket"), config, agg_identity)
    aggregator = fed.as_party(keys / "agg.key").aggregator(work / "w-agg")
    sites = {}
    for s, ds in sorted(datasets.items()):
        options = NnunetOptions(dataset=str(ds), configuration=configuration, trainer=TINY, num_processes=1,
                                num_processes_fingerprint=1, iterations_per_epoch=iterations,
                                val_iterations=val_iterations, validate=False)
        sites[s] = fed.as_party(keys / f"{s}.key").site(NnunetWork(options, mode=mode), work / f"w-{s}")
    actions: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the tiny trainer's fallback lookup
            for _ in range(max_steps):
                if all(p.state.finished for p in sites.values()):
                    break
                actions.append(f"agg {aggregator.step()}")
                for name, p in sites.items():
                    actions.append(f"{name} {p.step()}")
            else:
                raise AssertionError(f"the {mode} federation did not finish: {actions[-6:]}")
    finally:
        for p in sites.values():
            p.work.close()
    return SteppedFederation(fed, keys, actions, sites)
