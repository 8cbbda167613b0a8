"""Disk used after R rounds, with retention off (``keep_globals`` 0: every payload kept) and on.

A toy federation (two sites, synchronous, in one process on a local folder) whose model
carries an untrained 8 MB ballast tensor, so every payload has a realistic size (a 2D
nnU-Net is 30-120 MB; what matters here is how many payloads stay, not their content).
After the final global it measures the bucket folder, the aggregator's workdir and each
site's workdir (files counted once per inode: the aggregator hard-links its outputs into
its cache). Targets: with retention on, each stays within a fixed number of payloads,
whatever the number of rounds.

    python benchmarks/disk.py --json                 # 20 rounds, keep_globals 3 (the init default)
    python benchmarks/disk.py --json --rounds 40 --payload-mb 31
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py: the output shape
from _common import benchmark_output, target  # noqa: E402

from fedfs.testing.toy import ToyWork  # noqa: E402

SITES = ("A", "B")


class BallastWork(ToyWork):
    """ToyWork with an untrained ballast parameter of ``ballast`` float32 values in every payload."""

    def __init__(self, *args: Any, ballast: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ballast = ballast

    def _build(self):
        import torch

        model = super()._build()
        model.register_parameter("ballast", torch.nn.Parameter(torch.zeros(self.ballast)))
        return model


def folder_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root``, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def run_arm(root: Path, keys: Path, rounds: int, keep: int, ballast: int) -> dict[str, Any]:
    """One federation to the end; the bytes left in each place."""
    from fedfs.federation import Federation, config_from_key_dir
    from fedfs.roles.aggregator import Aggregator
    from fedfs.roles.site import Site

    config, agg = config_from_key_dir(keys, list(SITES), rounds=rounds, keep_globals=keep)
    fed, _ = Federation.create(str(root / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), root / "agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), BallastWork(s, cases=3, seed=i + 1, steps=1, ballast=ballast),
                     root / f"site-{s}") for i, s in enumerate(SITES)}
    t0 = time.perf_counter()
    for _ in range(20 * rounds + 50):
        if all(s.state.finished for s in sites.values()):
            break
        aggregator.step()
        for s in sites.values():
            s.step()
    else:
        raise RuntimeError("the federation did not finish")
    return {"keep_globals": keep, "bucket_bytes": folder_bytes(root / "bucket"),
            "aggregator_workdir_bytes": folder_bytes(root / "agg"),
            "site_workdir_bytes": max(folder_bytes(root / f"site-{s}") for s in SITES),  # the largest
            "wall_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--keep", type=int, default=3, help="keep_globals of the retention-on arm")
    ap.add_argument("--payload-mb", type=float, default=8.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from fedfs.trust.signing import generate_keypair

    ballast = int(args.payload_mb * 1e6 / 4)
    arms = {}
    with tempfile.TemporaryDirectory(prefix="fedfs-disk-") as tmp:
        keys = Path(tmp) / "keys"
        generate_keypair("agg", "aggregator", keys)
        for s in SITES:
            generate_keypair(s, "site", keys)
        for name, keep in (("off", 0), ("on", args.keep)):
            arms[name] = run_arm(Path(tmp) / name, keys, args.rounds, keep, ballast)
            init = Path(tmp) / name / "site-A" / "updates" / "init.safetensors"
            payload = init.stat().st_size
    on, off = arms["on"], arms["off"]
    n = len(SITES)
    # what retention keeps: K globals, each site's initial weights, the newest global's inputs
    bucket_cap = (args.keep + 2 * n + 1) * payload
    agg_cap = (args.keep + 2 * n + 1) * payload
    site_cap = 3 * payload  # the final global, the initial weights, one update in flight
    site_on = on["site_workdir_bytes"]
    targets = {
        "bucket_bounded": target(f"bucket with retention on <= (K + 2 x sites + 1) payloads = {bucket_cap} bytes",
                                 on["bucket_bytes"], on["bucket_bytes"] <= bucket_cap),
        "aggregator_workdir_bounded": target(f"aggregator workdir with retention on <= {agg_cap} bytes",
                                             on["aggregator_workdir_bytes"], on["aggregator_workdir_bytes"] <= agg_cap),
        "site_workdir_bounded": target(f"largest site workdir with retention on <= 3 payloads = {site_cap} bytes",
                                       site_on, site_on <= site_cap),
    }
    figures = {"rounds": args.rounds, "sites": n, "payload_bytes": payload, "work": "toy model + 8 MB ballast"
               if args.payload_mb == 8.0 else f"toy model + {args.payload_mb:g} MB ballast",
               "retention_off": off, "retention_on": on,
               "bucket_ratio_on_off": round(on["bucket_bytes"] / off["bucket_bytes"], 3)}
    print(json.dumps(benchmark_output("disk", figures, targets)))


if __name__ == "__main__":
    main()
