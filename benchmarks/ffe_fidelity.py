"""How close is fedfs's Federated Fingerprint Extraction to centralized nnU-Net?

Builds a synthetic, heterogeneous CT federation (3 sites, 12/8/5 cases, different
spacings, scanners and HU distributions with tails, a zero background so that
cropping to nonzero matters, integer HU), writes one nnU-Net raw dataset per site
plus the pooled one, and compares with nnU-Net's fingerprint and plans on the
pooled data:

* fedfs FFE: census -> merge -> summaries -> merge -> install -> plan on each site;
* the reference merge (FednnU-Net: case-count-weighted averages of local fingerprints).

Documents travel through a real folder bucket (``BucketTransport``): each is a
signed fedfs document published exclusively by its owner and verified by its
reader, exactly as in a federation.

Targets (issue 3), for FFE: plans identical to centralized nnU-Net's; relative error of the
exact statistics at most 1e-6, of the quantiles 0 on integer images (1e-3 otherwise);
CTNormalization within 1e-4 over the HU grid; a site's FFE step no slower than nnU-Net's own
fingerprint of its data.

``python benchmarks/ffe_fidelity.py --json`` prints one JSON object on stdout;
everything else (nnU-Net's chatter included) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Protocol

import numpy as np

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py: the output shape
from _common import benchmark_output, target  # noqa: E402

STAT_EXACT = ("mean", "std", "min", "max")
STAT_QUANTILE = ("median", "percentile_00_5", "percentile_99_5")

# name, dataset id, cases, base spacing (z, y, x), volume shape, organ HU model
SITES = [
    dict(name="SiteA", id=501, cases=12, spacing=(2.5, 0.8, 0.8), shape=(32, 44, 44),
         organ=(60, 12), tail=("normal", 0.03, 300, 80)),
    dict(name="SiteB", id=502, cases=8, spacing=(1.0, 1.0, 1.0), shape=(40, 40, 40),
         organ=(140, 30), tail=("normal", 0.06, 900, 300)),
    dict(name="SiteC", id=503, cases=5, spacing=(5.0, 0.6, 0.6), shape=(24, 48, 48),
         organ=(30, 25), tail=("metal", 0.01, 2500, 3071)),
]
POOLED = dict(name="Pooled", id=500)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ synthetic data

def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    d = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(len(shape)))
    return d <= 1.0


def make_case(rs: np.random.RandomState, site: dict, continuous: bool = False) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One CT-like volume (int16 HU, 0 outside the body) and its label map.

    ``continuous`` adds sub-HU noise and keeps float32, so the value tables must bin."""
    shape = site["shape"]
    c = np.array(shape) / 2 + rs.uniform(-2, 2, 3)
    body_r = np.array(shape) * rs.uniform(0.32, 0.45, 3)
    body = _ellipsoid(shape, c, body_r)
    img = np.zeros(shape, np.float32)
    n_body = int(body.sum())
    img[body] = rs.normal(40, 15, n_body)                               # soft tissue
    fat = body & ~_ellipsoid(shape, c, body_r * 0.85)
    img[fat] = rs.normal(-100, 20, int(fat.sum()))                      # subcutaneous fat
    air = body & (rs.uniform(size=shape) < 0.02)
    img[air] = rs.normal(-950, 30, int(air.sum()))                      # bowel gas
    bone = _ellipsoid(shape, c + np.array([0, body_r[1] * 0.5, 0]), np.array([shape[0], 3, 3]))
    img[bone & body] = rs.normal(700, 150, int((bone & body).sum()))   # spine
    organ = _ellipsoid(shape, c + rs.uniform(-2, 2, 3), body_r * rs.uniform(0.35, 0.5, 3)) & body
    mu, sd = site["organ"]
    img[organ] = rs.normal(mu, sd, int(organ.sum())) + (rs.standard_t(3, int(organ.sum())) * 8)
    kind, frac, a, b = site["tail"]
    tail = organ & (rs.uniform(size=shape) < frac)
    img[tail] = rs.normal(a, b, int(tail.sum())) if kind == "normal" else rs.uniform(a, b, int(tail.sum()))
    tumour = _ellipsoid(shape, c, np.array(shape) * 0.08) & organ
    img[tumour] = rs.normal(mu - 25, sd * 1.5, int(tumour.sum()))
    img = np.clip(np.round(img), -1024, 3071)
    img[~body] = 0                                                      # outside the scanner FOV
    img[body & (img == 0)] = 1                                          # keep the body nonzero
    if continuous:
        img[body] += rs.uniform(-0.49, 0.49, n_body).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[organ] = 1
    seg[tumour] = 2
    spacing = tuple(float(s * rs.uniform(0.9, 1.1)) for s in site["spacing"])
    return img.astype(np.float32 if continuous else np.int16), seg, spacing


def write_dataset(raw: str, ds_id: int, name: str, cases: list[tuple[str, np.ndarray, np.ndarray, tuple]]) -> str:
    import SimpleITK as sitk
    folder = os.path.join(raw, f"Dataset{ds_id:03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    for case_id, img, seg, spacing in cases:
        for arr, path in ((img, f"imagesTr/{case_id}_0000.nii.gz"), (seg, f"labelsTr/{case_id}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(tuple(reversed(spacing)))
            sitk.WriteImage(im, os.path.join(folder, path))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "tumour": 2},
                   "numTraining": len(cases), "file_ending": ".nii.gz"}, f)
    return folder


def build_federation(raw: str, seed: int, continuous: bool = False) -> None:
    rs = np.random.RandomState(seed)
    pooled = []
    for site in SITES:
        cases = [(f"{site['name']}_{i:03d}", *make_case(rs, site, continuous)) for i in range(site["cases"])]
        write_dataset(raw, site["id"], site["name"], cases)
        pooled += cases
    write_dataset(raw, POOLED["id"], POOLED["name"], pooled)


# ------------------------------------------------------------------ transport

class Transport(Protocol):
    def publish(self, key: str, doc: dict) -> None: ...
    def read(self, key: str) -> dict: ...


class MemoryTransport:
    """Documents kept as JSON text, so every hop is a real serialisation round trip."""

    def __init__(self) -> None:
        self.docs: dict[str, str] = {}

    def publish(self, key: str, doc: dict) -> None:
        if key in self.docs:
            raise FileExistsError(key)
        self.docs[key] = json.dumps(doc, allow_nan=False)

    def read(self, key: str) -> dict:
        return json.loads(self.docs[key])


class BucketTransport:
    """A real folder bucket: every hop is a signed fedfs document, published exclusively by the
    party that owns its key and verified (signature, role, schema) by the reader."""

    def __init__(self, workdir: str, site_names: list[str]) -> None:
        from fedfs.federation import Federation, config_from_key_dir
        from fedfs.trust.signing import generate_keypair, load_identity

        keys = os.path.join(workdir, "keys")
        generate_keypair("aggregator", "aggregator", keys)
        for s in site_names:
            generate_keypair(s, "site", keys)
        config, agg = config_from_key_dir(keys, site_names, mode="ffe", configuration="3d_fullres")
        self.fed, _ = Federation.create(os.path.join(workdir, "bucket"), config, agg)
        self.ids = {s: load_identity(os.path.join(keys, f"{s}.key")) for s in site_names}
        self.ids["aggregator"] = agg

    def _route(self, key: str, doc: dict | None):
        from fedfs import layout
        from fedfs.protocol.schema import Census, FingerprintSummary, GlobalFingerprint, PlansDocument, SiteCensus

        kind, who = key.split("/", 1)
        if kind == "census" and who == "global":
            return layout.CENSUS, Census, "aggregator", doc and Census(**doc)
        if kind == "census":
            return layout.site_census(who), SiteCensus, who, doc and SiteCensus(site=who, **doc)
        if kind == "summary":
            return layout.site_fingerprint(who), FingerprintSummary, who, doc and FingerprintSummary(
                site=who, mode="ffe", total_cases=doc["total_cases"], summary=doc)
        if kind == "fingerprint":
            return layout.GLOBAL_FINGERPRINT, GlobalFingerprint, "aggregator", doc and GlobalFingerprint(
                fingerprint=doc, sites=sorted(self.fed.config.site_names), total_cases=len(doc["spacings"]))
        if kind == "plans":
            return layout.site_plans(who), PlansDocument, who, doc and PlansDocument(
                site=who, plans_identifier="nnUNetPlans", configuration="3d_fullres", **doc)
        raise KeyError(key)

    def publish(self, key: str, doc: dict) -> None:
        bucket_key, _, party, document = self._route(key, doc)
        self.fed.bucket.publish(bucket_key, document, self.ids[party])

    def read(self, key: str) -> dict:
        import dataclasses

        bucket_key, cls, _, _ = self._route(key, None)
        body = self.fed.bucket.read(bucket_key, cls).doc
        if key.startswith("summary/"):
            return body.summary
        if key.startswith("fingerprint/"):
            return body.fingerprint
        if key.startswith("plans/"):
            return {"digest": body.digest, "summary": body.summary}
        return {f.name: getattr(body, f.name) for f in dataclasses.fields(body)
                if f.name in ("num_cases", "num_channels", "total_cases", "sites")}


def make_transport(workdir: str, site_names: list[str] | None = None) -> Transport:
    """A real folder bucket with signed documents (the in-memory transport is kept for debugging)."""
    return BucketTransport(workdir, site_names) if site_names else MemoryTransport()


# ------------------------------------------------------------------ the protocol

def run_ffe(t: Transport, sites: list[dict], num_processes: int, planner: str, **summary_options: Any) -> dict:
    from fedfs.fl import fingerprint as fp
    from fedfs.fl import plans as pl
    from fedfs.nnunet import adapter as nn
    timing: dict[str, float] = {}
    for s in sites:                                       # site, phase 1
        t0 = time.perf_counter()
        t.publish(f"census/{s['name']}", nn.site_census(s["id"]))
        timing[s["name"]] = time.perf_counter() - t0
    census = fp.merge_census({s["name"]: t.read(f"census/{s['name']}") for s in sites})  # aggregator
    t.publish("census/global", census)
    for s in sites:                                       # site, phase 2
        t0 = time.perf_counter()
        total = fp.validate_federation_census(t.read("census/global"), "census")["total_cases"]
        t.publish(f"summary/{s['name']}", nn.site_summary(s["id"], total, num_processes=num_processes,
                                                                    **summary_options))
        timing[s["name"]] += time.perf_counter() - t0
    summaries = {s["name"]: t.read(f"summary/{s['name']}") for s in sites}                # aggregator
    t.publish("fingerprint/global", fp.merge_summaries(summaries, t.read("census/global")))
    plans = {}
    for s in sites:                                       # sites plan locally
        nn.install_fingerprint(s["id"], t.read("fingerprint/global"))
        plans[s["name"]] = nn.plan(s["id"], planner=planner)
        t.publish(f"plans/{s['name']}", {"digest": pl.plans_digest(plans[s["name"]]),
                                         "summary": pl.plans_summary(plans[s["name"]], "3d_fullres")})
    digests = {s["name"]: t.read(f"plans/{s['name']}")["digest"] for s in sites}          # aggregator
    sizes = {s["name"]: len(json.dumps(summaries[s["name"]])) for s in sites}
    return {"fingerprint": t.read("fingerprint/global"), "plans": plans, "digests": digests,
            "site_step_s": timing, "summary_bytes": sizes,
            "table_mode": sorted({str(c["mantissa_bits"]) for d in summaries.values() for c in d["channels"]})}


# ------------------------------------------------------------------ metrics

def rel_errors(fed: dict, ref: dict) -> dict[str, float]:
    """Signed relative error per statistic, worst channel."""
    out: dict[str, float] = {}
    for ch, r in ref["foreground_intensity_properties_per_channel"].items():
        f = fed["foreground_intensity_properties_per_channel"][str(ch)]
        for k in STAT_EXACT + STAT_QUANTILE:
            e = (f[k] - r[k]) / abs(r[k]) if r[k] != 0 else float(f[k] != r[k]) * float("inf")
            if abs(e) >= abs(out.get(k, 0.0)):
                out[k] = e
    return out


def ct_norm_diff(fed: dict, ref: dict) -> tuple[float, float]:
    from fedfs.nnunet.adapter import ct_normalize
    grid = np.arange(-1024, 3072, dtype=np.float32)
    worst, mean = 0.0, 0.0
    for ch, r in ref["foreground_intensity_properties_per_channel"].items():
        d = np.abs(ct_normalize(grid, fed["foreground_intensity_properties_per_channel"][str(ch)])
                   - ct_normalize(grid, r))
        worst, mean = max(worst, float(d.max())), max(mean, float(d.mean()))
    return worst, mean


def _worst(errs: dict[str, float], keys: tuple[str, ...]) -> float:
    return max(abs(errs[k]) for k in keys)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--planner", default="ExperimentPlanner")
    ap.add_argument("--intensities", choices=("integer", "continuous"), default="integer",
                    help="integer HU or float32 with sub-HU noise")
    ap.add_argument("--max-exact-values", type=int, default=None,
                    help="distinct values per site and channel before tables are binned (default: fedfs's)")
    ap.add_argument("--mantissa-bits", type=int, default=None, help="bin resolution of binned tables")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ffe_fidelity_") as tmp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[var] = os.path.join(tmp, var)
            os.makedirs(os.environ[var], exist_ok=True)
        from fedfs.fl import fingerprint as fp
        from fedfs.fl import plans as pl
        from fedfs.nnunet import adapter as nn
        log("writing synthetic federation ...")
        build_federation(os.environ["nnUNet_raw"], args.seed, args.intensities == "continuous")

        log("centralized nnU-Net on the pooled data ...")
        t0 = time.perf_counter()
        central_fp = nn.local_fingerprint(POOLED["id"], num_processes=args.num_processes)
        central_fp_s = time.perf_counter() - t0
        central_plans = nn.plan(POOLED["id"], planner=args.planner)

        log("fedfs FFE ...")
        options = {k: v for k, v in (("max_exact_values", args.max_exact_values),
                                     ("mantissa_bits", args.mantissa_bits)) if v is not None}
        ffe = run_ffe(make_transport(tmp, [s["name"] for s in SITES]), SITES, args.num_processes, args.planner,
                      **options)

        log("reference merge (local nnU-Net fingerprints, weighted averages) ...")
        local_fps, local_s = {}, {}
        for s in SITES:
            t0 = time.perf_counter()
            local_fps[s["name"]] = nn.local_fingerprint(s["id"], num_processes=args.num_processes)
            local_s[s["name"]] = time.perf_counter() - t0
        ref_fp = fp.reference_merge(local_fps)
        nn.install_fingerprint(SITES[0]["id"], ref_fp)
        ref_plans = nn.plan(SITES[0]["id"], planner=args.planner)

    fed_site = SITES[0]["name"]
    plans_diff = pl.diff_plans(ffe["plans"][fed_site], central_plans, rel_tol=1e-6)
    ref_diff = pl.diff_plans(ref_plans, central_plans, rel_tol=1e-6)
    fed_err, ref_err = rel_errors(ffe["fingerprint"], central_fp), rel_errors(ref_fp, central_fp)
    fed_ct, ref_ct = ct_norm_diff(ffe["fingerprint"], central_fp), ct_norm_diff(ref_fp, central_fp)
    figures = {
        "plans_identical": not plans_diff,
        "plans_diff": plans_diff,
        "site_plans_identical": len(set(ffe["digests"].values())) == 1,
        "max_rel_err_exact_stats": _worst(fed_err, STAT_EXACT),
        "max_rel_err_quantiles": _worst(fed_err, STAT_QUANTILE),
        "ct_norm_max_abs_diff": fed_ct[0],
        "ct_norm_mean_abs_diff": fed_ct[1],
        "rel_err_per_stat": fed_err,
        "reference_plans_identical": not ref_diff,
        "reference_plans_diff": ref_diff,
        "reference_max_rel_err_exact_stats": _worst(ref_err, STAT_EXACT),
        "reference_max_rel_err_quantiles": _worst(ref_err, STAT_QUANTILE),
        "reference_ct_norm_max_abs_diff": ref_ct[0],
        "reference_ct_norm_mean_abs_diff": ref_ct[1],
        "reference_rel_err_per_stat": ref_err,
        "intensities": args.intensities,
        "quantile_table_mantissa_bits": ffe["table_mode"],
        "summary_bytes": ffe["summary_bytes"],
        "cases_per_site": {s["name"]: s["cases"] for s in SITES},
        "timing_s": {
            "ffe_site_step": {k: round(v, 3) for k, v in ffe["site_step_s"].items()},
            "nnunet_local_fingerprint": {k: round(v, 3) for k, v in local_s.items()},
            "nnunet_centralized_fingerprint": round(central_fp_s, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
    }
    return benchmark_output("ffe_fidelity", figures, check_targets(figures))


def check_targets(f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 3's targets for FFE against centralized nnU-Net (the reference merge's figures are for contrast)."""
    integer = f["intensities"] == "integer"
    quantile_limit = 0.0 if integer else 1e-3
    timing = f["timing_s"]
    step_ratio = max(timing["ffe_site_step"][site] / timing["nnunet_local_fingerprint"][site]
                     for site in timing["ffe_site_step"])
    return {
        "plans_identical": target("plans fields differing from centralized nnU-Net's (rel. tol. 1e-6) == 0",
                                  len(f["plans_diff"]), f["plans_identical"]),
        "max_rel_err_exact_stats": target("max relative error of mean, std, min, max <= 1e-6",
                                          f["max_rel_err_exact_stats"], f["max_rel_err_exact_stats"] <= 1e-6),
        "max_rel_err_quantiles": target(
            "max relative error of median, p0.5, p99.5 " + ("== 0 (integer images)" if integer else "<= 1e-3"),
            f["max_rel_err_quantiles"], f["max_rel_err_quantiles"] <= quantile_limit),
        "ct_norm_max_abs_diff": target("max |CTNormalization difference| over the HU grid <= 1e-4",
                                       f["ct_norm_max_abs_diff"], f["ct_norm_max_abs_diff"] <= 1e-4),
        "site_step_cost": target("max over sites of FFE site step / nnU-Net's own fingerprint of its data <= 1",
                                 round(step_ratio, 3), step_ratio <= 1),
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # nnU-Net and its worker processes print to fd 1; keep stdout for the JSON
    try:
        result = main()
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
    print(json.dumps(result, indent=None if "--json" in sys.argv else 2))
