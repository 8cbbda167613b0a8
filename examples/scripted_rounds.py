"""Drive an nnU-Net federation step by step from Python: two synthetic sites, FFE, two rounds.

Every party is an object in this one process and the "cron" is a loop, which
makes the order of events easy to follow (and to change: stop a site, resume it,
inspect the bucket between steps). `fedfs simulate` runs the same roles as
separate processes.

    python examples/scripted_rounds.py [/tmp/fedfs-scripted]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def main(root: Path) -> None:
    from fedfs import (Federation, NnunetOptions, NnunetWork, collect_status, config_from_key_dir,
                       generate_keypair, make_federation, nnunet_environment)

    os.environ.update(nnunet_environment(root))  # nnUNet_raw/_preprocessed/_results under root

    datasets = make_federation(os.environ["nnUNet_raw"], n_sites=2, base_id=701, test_root=root / "heldout")
    keys = root / "keys"
    generate_keypair("coordinator", "aggregator", keys)
    names = [d.dataset_name.split("_", 1)[1] for d in datasets]
    for name in names:
        generate_keypair(name, "site", keys)
    config, agg_key = config_from_key_dir(keys, names, mode="ffe", configuration="2d", rounds=2)
    url = str(root / "bucket")
    Federation.create(url, config, agg_key)

    aggregator = Federation.open(url, identity=keys / "coordinator.key").aggregator(root / "work" / "aggregator")
    sites = []
    for name, d in zip(names, datasets):
        fed = Federation.open(url, identity=keys / f"{name}.key")
        work = NnunetWork(NnunetOptions(dataset=str(d.dataset_id), trainer="nnUNetTrainerFedfsTiny",
                                        num_processes=1, num_processes_fingerprint=1, validate=False),
                          mode=fed.config.mode)
        sites.append(fed.site(work, root / "work" / name))

    while not all(s.state.finished for s in sites):
        print("aggregator:", aggregator.step())
        for s in sites:
            print(f"{s.name}:", s.step())
    print("aggregator:", aggregator.step())
    status = collect_status(Federation.open(url))
    print("final global version:", status["global"]["version"], "final:", status["global"]["final"])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fedfs-scripted-")))
