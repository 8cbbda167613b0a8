"""How fast does ``fedfs --help`` answer, and does it stay clear of torch and nnU-Net?

Runs the installed console script N times (a fresh interpreter each time, as a user
would) and prints one JSON object: median and max wall time, and which heavy modules
``import fedfs.cli`` + ``--help`` loaded. Targets: median under 0.5 s; neither torch nor
nnU-Net loaded.

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

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py: the output shape
from _common import benchmark_output, target  # noqa: E402

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
    median = round(statistics.median(times), 4)
    heavy = sorted({"torch", "nnunetv2"} & set(loaded))
    targets = {
        "help_median_s": target("median wall time of `fedfs --help` < 0.5 s", median, median < 0.5),
        "no_torch_or_nnunet": target("`fedfs --help` loads neither torch nor nnunetv2",
                                     ", ".join(heavy) or "neither loaded", not heavy),
    }
    figures = {"runs": args.n, "help_median_s": median, "help_max_s": round(max(times), 4),
               "heavy_modules_loaded": loaded}
    print(json.dumps(benchmark_output("cli_startup", figures, targets)))


if __name__ == "__main__":
    main()
