"""How fast does ``fedfs --help`` answer, and does it stay clear of torch and nnU-Net?

Runs the installed console script N times (a fresh interpreter each time, as a user
would) and prints one JSON object: median and max wall time, and which heavy modules
``import fedfs.cli`` + ``--help`` loaded. Target: median under 0.5 s, none loaded.

    python benchmarks/cli_startup.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "nnunetv2", "s3fs", "smbprotocol", "matplotlib", "rich", "numpy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    ap.add_argument("-n", type=int, default=10)
    args = ap.parse_args()
    fedfs = str(Path(sys.executable).with_name("fedfs"))
    times = []
    for _ in range(args.n):
        t0 = time.perf_counter()
        subprocess.run([fedfs, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    code = ("import sys; from fedfs.cli import main; main(['--help'], standalone_mode=False); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1].replace("'", '"'))
    result = {"runs": args.n, "help_median_s": round(statistics.median(times), 4), "help_max_s": round(max(times), 4),
              "heavy_modules_loaded": loaded, "target_s": 0.5,
              "meets_target": statistics.median(times) < 0.5 and not ({"torch", "nnunetv2"} & set(loaded))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
