"""Total parsing under fuzzing: 100,000 hostile inputs per decoder of bucket bytes, and what escaped.

Every decoder in :mod:`fedfs.testing.fuzz` (documents read through the verified bucket and
what the party does next with them, the ``latest`` hint, ``federation.json``, bundle manifests,
safetensors headers, the strict JSON decoder) gets ``--inputs`` inputs, each made by the same
mutation engine tests/test_fuzz.py's hypothesis strategies use, from seed ``"<seed>:<decoder>:<i>"``
(so any input replays alone: ``--replay DECODER:I``). Per decoder: inputs run, unhandled exceptions
(anything but a ValidationError; for the ``latest`` hint anything at all), rejections, max / p99 /
median time per input (untraced), and peak memory per input (tracemalloc started and stopped
around a second decode of every 10th input and of every input over 16 KiB, where peaks are large). Prints one JSON object in the shape of ``benchmarks/_common.py``.

    python benchmarks/fuzz.py --json                # 100,000 per decoder (the issue's target)
    python benchmarks/fuzz.py --json --quick        # 3,000 per decoder (run_all's form)
    python benchmarks/fuzz.py --replay update:4711  # one input: its bytes and what it did
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py: the output shape
from _common import benchmark_output, target  # noqa: E402

FULL_INPUTS = 100_000
QUICK_INPUTS = 3_000
MAX_SECONDS = 2.0  # per input; inputs reach ~2 MB, and the machine is shared
P99_SECONDS = 0.05
MAX_PEAK_BYTES = 64 << 20


def _input(targets: dict[str, Any], name: str, seed: int, i: int) -> bytes:
    from fedfs.testing import fuzz

    return fuzz.make_input(targets[name], random.Random(f"{seed}:{name}:{i}"))


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_decoder(name: str, inputs: int, seed: int, memory_every: int) -> dict[str, Any]:
    """Feed ``inputs`` hostile inputs to one decoder; its row of figures. Times come from untraced
    runs; memory is traced (a second run) for every ``memory_every``-th input and every input over
    16 KiB, the ones whose peak can be large (0: none)."""
    logging.disable(logging.CRITICAL)  # readers log every file they skip
    from fedfs.testing import fuzz

    targets = fuzz.targets()
    tgt = targets[name]
    times, peaks, escapes, rejected, largest = [], [], [], 0, 0
    t0 = time.monotonic()
    for i in range(inputs):
        data = _input(targets, name, seed, i)
        largest = max(largest, len(data))
        out = fuzz.run_input(tgt, data)
        times.append(out.seconds)
        if memory_every and (i % memory_every == 0 or len(data) > 16384):
            peaks.append(fuzz.run_input(tgt, data, trace_memory=True).peak_bytes)
        rejected += out.rejected
        if out.escaped is not None:
            escapes.append({"input": i, "error": out.escaped, "replay": f"python benchmarks/fuzz.py --replay {name}:{i}"})
    times.sort()
    peaks.sort()
    return {"decoder": name, "inputs": inputs, "unhandled": len(escapes), "rejected": rejected,
            "decoded": inputs - rejected - len(escapes), "max_ms": round(times[-1] * 1e3, 2) if times else 0,
            "p99_ms": round(_quantile(times, 0.99) * 1e3, 3), "median_ms": round(_quantile(times, 0.5) * 1e3, 3),
            "peak_kib_max": round(peaks[-1] / 1024, 1) if peaks else 0,
            "peak_kib_p99": round(_quantile(peaks, 0.99) / 1024, 1), "memory_traced": len(peaks),
            "largest_input_kib": round(largest / 1024, 1),
            "wall_s": round(time.monotonic() - t0, 1), "first_escapes": escapes[:5]}


def _done(r: dict[str, Any], rows_file: str | None) -> dict[str, Any]:
    print(f"  {r['decoder']}: {r['inputs']} inputs, {r['unhandled']} unhandled, max {r['max_ms']} ms, "
          f"p99 {r['p99_ms']} ms, peak {r['peak_kib_max']} KiB, {r['wall_s']} s", file=sys.stderr, flush=True)
    if rows_file:
        with open(rows_file, "a") as fh:
            fh.write(json.dumps(r) + "\n")
    return r


def replay(spec: str, seed: int) -> int:
    from fedfs.testing import fuzz

    name, _, i = spec.rpartition(":")
    targets = fuzz.targets()
    data = _input(targets, name, seed, int(i))
    out = fuzz.run_input(targets[name], data, trace_memory=True)
    print(json.dumps({"decoder": name, "input": int(i), "bytes": len(data), "head": data[:400].decode("latin-1"),
                      "escaped": out.escaped, "rejected": out.rejected, "seconds": out.seconds,
                      "peak_bytes": out.peak_bytes}, indent=1))
    try:
        targets[name].decode(data)
    except targets[name].allowed as exc:
        print(f"rejected: {type(exc).__name__}: {str(exc)[:500]}", file=sys.stderr)
    return 1 if out.escaped else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_INPUTS} inputs per decoder")
    ap.add_argument("--inputs", type=int, help=f"inputs per decoder (default {FULL_INPUTS})")
    ap.add_argument("--decoder", action="append", help="only this decoder (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="decoders run in parallel processes")
    ap.add_argument("--memory-every", type=int, default=10,
                    help="trace memory for every K-th input and every input over 16 KiB (0: never; 1: all)")
    ap.add_argument("--replay", metavar="DECODER:I", help="run one input and show it")
    ap.add_argument("--rows-file", help="append each decoder's row here as a JSON line when it finishes "
                                        "(a long run killed early keeps what it finished)")
    args = ap.parse_args()
    if args.replay:
        return replay(args.replay, args.seed)
    from fedfs.testing import fuzz

    names = sorted(args.decoder or fuzz.targets())
    inputs = args.inputs or (QUICK_INPUTS if args.quick else FULL_INPUTS)
    t0 = time.monotonic()
    print(f"fuzz: {len(names)} decoders x {inputs} inputs, {args.jobs} job(s)", file=sys.stderr, flush=True)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_decoder, n, inputs, args.seed, args.memory_every) for n in names]
            for fut in as_completed(futures):
                _done(fut.result(), args.rows_file)
            rows = sorted((f.result() for f in futures), key=lambda r: r["decoder"])
    else:
        rows = []
        for name in names:
            rows.append(_done(run_decoder(name, inputs, args.seed, args.memory_every), args.rows_file))
    unhandled = sum(r["unhandled"] for r in rows)
    fewest = min(r["inputs"] for r in rows)
    worst_max = max(r["max_ms"] for r in rows) / 1e3
    worst_p99 = max(r["p99_ms"] for r in rows) / 1e3
    worst_peak = max(r["peak_kib_max"] for r in rows) * 1024
    memory = worst_peak if args.memory_every else None
    targets = {
        "unhandled_exceptions": target("no input makes any decoder raise anything but a ValidationError "
                                       "(the latest hint: anything at all)", unhandled, unhandled == 0),
        "inputs_per_decoder": target(f"every decoder ran the inputs asked (the full form: {FULL_INPUTS:,})",
                                     fewest, fewest >= inputs),
        "max_seconds_per_input": target(f"slowest input of any decoder < {MAX_SECONDS} s (inputs up to ~2 MB)",
                                        round(worst_max, 4), worst_max < MAX_SECONDS),
        "p99_seconds_per_input": target(f"99th percentile time per input < {P99_SECONDS * 1e3:.0f} ms, every decoder",
                                        round(worst_p99, 5), worst_p99 < P99_SECONDS),
        "peak_memory_per_input": target(f"largest peak allocation of one input (tracemalloc; every "
                                        f"{args.memory_every}th input and all over 16 KiB) < {MAX_PEAK_BYTES >> 20} MiB",
                                        memory,
                                        memory is not None and memory < MAX_PEAK_BYTES),
    }
    figures = {"decoders": len(rows), "inputs_per_decoder": inputs, "inputs_total": sum(r["inputs"] for r in rows),
               "unhandled_total": unhandled, "seed": args.seed, "full_form": f"python benchmarks/fuzz.py --json "
               f"({FULL_INPUTS:,} per decoder)", "duration_s": round(time.monotonic() - t0, 1),
               "cpu_count": os.cpu_count(), "rows": rows}
    print(json.dumps(benchmark_output("fuzz", figures, targets), indent=1))
    return 0 if unhandled == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
