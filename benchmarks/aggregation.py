"""How fast, and in how much memory, does fedfs aggregate N site updates?

For nnU-Net-shaped models (tensor shapes taken from real dynamic_network_architectures
networks built on the meta device: 2D 5-stage 7.8 M params in 88 tensors, 3D fullres
16.5 M in 88, 2D 7-stage 33.5 M in 128) and N updates on local disk, each row compares:

* ``fedfs_s``: :func:`fedfs.weights.combine.aggregate` (FedAvg weighted by cases), output written;
* ``read_floor_s``: merely reading the N safetensors files (1 MiB ``readinto`` into one buffer);
* ``naive_s``: the reference approach, measured here on this benchmark's own pickles:
  ``torch.load`` every state dict, stack the common keys, mean, ``torch.save``.

Inputs are page-cached (written just before). Every measurement runs in a fresh
subprocess: imports first, then the RSS baseline (``VmRSS``, after resetting the
high-water mark), then a warm-up and timed repeats (minimum reported), then the
peak (``VmHWM``). ``*_peak_rss_mb`` are absolute peaks; ``*_extra_rss_mb`` are peaks
above the baseline. Targets: ``fedfs_s <= 1.5 * read_floor_s`` for N >= 8, and fedfs
extra RSS <= 1.0 x model size for every N.

``python benchmarks/aggregation.py --json [--quick]`` prints one JSON object on stdout;
logs go to stderr. ``--quick``: the 2D and large models at N in {2, 8}. Issue 18's N=100 run (3 GB of
updates): ``--models 2d --ns 8 32 100 --no-naive --repeat 3`` (no pickles for the reference approach).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py: the output shape
from _common import benchmark_output, target  # noqa: E402

MODELS = ("2d", "3d_fullres", "large")
MB = 1024 * 1024


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def model_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a real nnU-Net network for ``model``, built without memory (meta)."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    dim, n, feats = {"2d": (2, 5, [32, 64, 128, 256, 512]), "3d_fullres": (3, 5, [32, 64, 128, 256, 320]),
                     "large": (2, 7, [32, 64, 128, 256, 512, 512, 512])}[model]
    conv = torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d
    norm = torch.nn.InstanceNorm2d if dim == 2 else torch.nn.InstanceNorm3d
    with torch.device("meta"):
        net = PlainConvUNet(1, n, feats, conv, [[3] * dim] * n, [[1] * dim] + [[2] * dim] * (n - 1), [2] * n, 3,
                            [2] * (n - 1), conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                            nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    return {k: tuple(p.shape) for k, p in net.named_parameters()}


def make_inputs(model: str, n: int, folder: str, pickles: bool = True) -> tuple[list[str], list[str]]:
    """N safetensors updates (fedfs) and N pickles of the same tensors (reference approach; none without ``pickles``)."""
    import torch
    from fedfs.weights.tensors import save_weights

    shapes = model_shapes(model)
    st, pk = [], []
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 + i)
        state = {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
        st.append(os.path.join(folder, f"site{i:02d}.safetensors"))
        pk.append(os.path.join(folder, f"site{i:02d}.pt"))
        save_weights(st[-1], state, {"site": f"site{i:02d}", "num_cases": str(10 + 3 * i)})
        if pickles:
            torch.save(state, pk[-1])
    return st, pk


# ------------------------------------------------------------------ measured in a subprocess
def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _measure(kind: str, files: list[str], out: str, repeat: int, threads: int | None) -> dict[str, float]:
    import gc

    import torch  # noqa: F401  (imports are part of the baseline, not of the measurement)
    from fedfs.fl.aggregate import Update
    from fedfs.weights.combine import aggregate

    def floor() -> None:
        buf = bytearray(MB)
        view = memoryview(buf)
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass

    def fedfs() -> None:
        aggregate([Update(f"site{i:02d}", p) for i, p in enumerate(files)], out, threads=threads)

    def naive() -> None:
        states = [torch.load(p, map_location="cpu", weights_only=True) for p in files]
        keys = [k for k in states[0] if all(k in s and s[k].shape == states[0][k].shape for s in states)]
        result = {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in keys}
        torch.save(result, out)

    fn = {"floor": floor, "fedfs": fedfs, "naive": naive}[kind]
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM so that import-time peaks do not count
    except OSError:
        pass
    baseline = _status("VmRSS")
    times, cpu = [], []
    for i in range(repeat + 1):  # the first run is a warm-up
        if os.path.exists(out):
            os.unlink(out)  # outputs are fresh files in real use; freeing old pages is not aggregation
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"s": min(times), "cpu_s": min(cpu), "baseline_rss_mb": baseline, "peak_rss_mb": _status("VmHWM")}


def measure(kind: str, files: list[str], out: str, repeat: int, threads: int | None = None) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure", kind, "--out", out, "--repeat", str(repeat),
           *(["--threads", str(threads)] if threads else []), *files]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        log(done.stderr)
        raise RuntimeError(f"{kind} measurement failed")
    return json.loads(done.stdout)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(models: list[str], ns: list[int], repeat: int, folder: str, threads: int | None,
        naive: bool = True) -> dict[str, Any]:
    rows, load_start = [], os.getloadavg()[0]
    for model in models:
        sub = tempfile.mkdtemp(prefix=f"{model}-", dir=folder)
        st, pk = make_inputs(model, max(ns), sub, pickles=naive)
        os.sync()  # no writeback of the inputs in flight: it would throttle the measured writes
        model_mb = os.path.getsize(st[0]) / MB
        for n in ns:
            out = os.path.join(sub, "out")
            fl = measure("floor", st[:n], out, repeat)
            fe = measure("fedfs", st[:n], out + ".safetensors", repeat, threads)
            nv = measure("naive", pk[:n], out + ".pt", max(1, repeat // 2)) if naive else \
                {"s": None, "peak_rss_mb": None, "baseline_rss_mb": None}
            row = {
                "model": model, "n": n, "model_mb": round(model_mb, 1),
                "fedfs_s": round(fe["s"], 4), "read_floor_s": round(fl["s"], 4), "naive_s": _r(nv["s"], 4),
                "fedfs_peak_rss_mb": round(fe["peak_rss_mb"], 1), "naive_peak_rss_mb": _r(nv["peak_rss_mb"], 1),
                "baseline_rss_mb": round(fe["baseline_rss_mb"], 1),
                "naive_baseline_rss_mb": _r(nv["baseline_rss_mb"], 1),
                "fedfs_extra_rss_mb": round(fe["peak_rss_mb"] - fe["baseline_rss_mb"], 1),
                "naive_extra_rss_mb": None if nv["s"] is None else round(nv["peak_rss_mb"] - nv["baseline_rss_mb"], 1),
                "fedfs_over_floor": round(fe["s"] / fl["s"], 2),
                "fedfs_cpu_s": round(fe["cpu_s"], 4), "read_floor_cpu_s": round(fl["cpu_s"], 4),
            }
            log(json.dumps(row))
            rows.append(row)
        shutil.rmtree(sub, ignore_errors=True)
    figures = {"cpus": os.cpu_count(), "repeat": repeat,
               "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)], "rows": rows}
    return benchmark_output("aggregation", figures, check_targets(rows))


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def check_targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row: time within 1.5x the read floor (N >= 8), extra memory within one model size (every N)."""
    targets = {}
    for r in rows:
        name = f"{r['model']}.n{r['n']}"
        if r["n"] >= 8:
            targets[f"{name}.fedfs_over_floor"] = target(
                "fedfs_s / read_floor_s <= 1.5", r["fedfs_over_floor"], r["fedfs_over_floor"] <= 1.5)
        targets[f"{name}.fedfs_extra_rss_mb"] = target(
            f"fedfs_extra_rss_mb <= model_mb ({r['model_mb']})", r["fedfs_extra_rss_mb"],
            r["fedfs_extra_rss_mb"] <= r["model_mb"])
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="2d and large models, N in {2, 8}")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dir", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None, help="fedfs worker threads (default: fedfs's choice)")
    ap.add_argument("--ns", type=int, nargs="+", default=None, help="N values (default {2, 8, 16}; quick {2, 8})")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None, help="models (default all; quick 2d, large)")
    ap.add_argument("--no-naive", action="store_true",
                    help="skip the reference approach and its pickles (N=100 of the 2D model: 3 GB fewer)")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        print(json.dumps(_measure(args._measure, args.files, args.out, args.repeat, args.threads)))
        return
    models = args.models or (["2d", "large"] if args.quick else list(MODELS))
    ns = args.ns or ([2, 8] if args.quick else [2, 8, 16])
    folder = tempfile.mkdtemp(prefix="fedfs-bench-", dir=args.dir)
    try:
        result = run(models, ns, args.repeat, folder, args.threads, naive=not args.no_naive)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
