"""Federated fingerprint math (fedfs.fl.fingerprint), by hand and against numpy on pooled samples."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from fedfs.fl import fingerprint as fp

from fedfs.fl import plans as pl
from fedfs.errors import SchemaError, ValidationError


def _site(cases: list[list[float]], total_cases: int, spc: int, spacing=(1.0, 1.0), **kw) -> dict:
    """A site summary built from explicit per-case samples (float32, as nnU-Net reads them)."""
    b = fp.SiteSummaryBuilder(1, total_cases, spc, **kw)
    for i, samples in enumerate(cases):
        arr = np.asarray(samples, np.float32)
        b.add_case([spacing[0] + i, spacing[1]], [10 + i, 12], 0.5 + 0.1 * i,
                   [fp.summarize_samples(arr)], str(arr.dtype) if arr.size else "float64")
    return b.summary()


# ------------------------------------------------------------------ hand-computed merges

def test_merge_census_totals_cases_per_site():
    # Prepare
    censuses = {"b": {"num_cases": 5, "num_channels": 2}, "a": {"num_cases": 3, "num_channels": 2}}

    # Execute
    census = fp.merge_census(censuses)

    # Assert
    assert census == {"total_cases": 8, "num_channels": 2, "sites": {"a": 3, "b": 5}}
    assert list(census["sites"]) == ["a", "b"]


def test_merge_census_rejects_channel_disagreement():
    with pytest.raises(ValidationError, match="a=1, b=2"):
        fp.merge_census({"a": {"num_cases": 3, "num_channels": 1}, "b": {"num_cases": 5, "num_channels": 2}})


def test_merge_moments_matches_hand_computation():
    # Prepare: [1, 2, 3] -> (3, 2, 2); [4, 6] -> (2, 5, 2); pooled [1, 2, 3, 4, 6]
    a, b = (3, 2.0, 2.0), (2, 5.0, 2.0)

    # Execute
    n, mean, m2 = fp.merge_moments(a, b)

    # Assert: mean 16/5, m2 = 2 + 2 + 3**2 * 3 * 2 / 5 = 14.8
    assert (n, mean) == (5, 3.2)
    assert m2 == pytest.approx(14.8, rel=1e-15)
    assert fp.merge_moments((0, 0.0, 0.0), b) == b


@pytest.mark.parametrize("values,counts,expected", [
    ([1, 2, 3, 4], [1, 1, 1, 1], [1.015, 2.5, 3.985]),   # (n-1)q = 0.015, 1.5, 2.985
    ([0, 10], [3, 1], [0.0, 0.0, 9.85]),                   # samples 0 0 0 10
    ([7], [4], [7.0, 7.0, 7.0]),
])
def test_table_percentiles_hand_computed(values, counts, expected):
    got = fp.table_percentiles(np.array(values, float), np.array(counts), np.float32)
    assert got == pytest.approx(expected, rel=1e-6)


def test_merge_summaries_hand_computed():
    # Prepare: spc 2; site a one case [1, 3]; site b cases [2, 2] and [5, 8]
    census = {"total_cases": 3, "num_channels": 1, "sites": {"a": 1, "b": 2}}
    summaries = {"b": _site([[2, 2], [5, 8]], 3, 2, spacing=(2.0, 2.0)), "a": _site([[1, 3]], 3, 2, spacing=(5.0, 1.0))}

    # Execute
    merged = fp.merge_summaries(summaries, census)

    # Assert: pooled [1, 2, 2, 3, 5, 8]: mean 3.5, squared deviations sum to 33.5
    p = merged["foreground_intensity_properties_per_channel"]["0"]
    assert p["mean"] == 3.5
    assert p["std"] == pytest.approx(math.sqrt(33.5 / 6), rel=1e-15)
    assert (p["min"], p["max"], p["median"]) == (1.0, 8.0, 2.5)
    assert p["percentile_00_5"] == pytest.approx(1.025, rel=1e-6)   # 1 + 0.025 * (2 - 1)
    assert p["percentile_99_5"] == pytest.approx(7.925, rel=1e-6)   # 5 + 0.975 * (8 - 5)
    assert merged["spacings"] == [[2.0, 2.0], [3.0, 2.0], [5.0, 1.0]]  # all cases sorted, pairs kept
    assert merged["shapes_after_crop"] == [[10, 12], [11, 12], [10, 12]]
    assert merged["median_relative_size_after_cropping"] == 0.5


def test_reference_merge_weights_by_case_count():
    # Prepare
    def local(n, mean, std, lo, hi):
        stats = {"mean": mean, "median": mean, "std": std, "min": lo, "max": hi,
                 "percentile_00_5": lo, "percentile_99_5": hi}
        return {"spacings": [[1.0]] * n, "shapes_after_crop": [[4]] * n,
                "foreground_intensity_properties_per_channel": {"0": stats},
                "median_relative_size_after_cropping": 1.0}

    # Execute
    ref = fp.reference_merge({"a": local(3, 10.0, 1.0, 0.0, 20.0), "b": local(1, 30.0, 5.0, -5.0, 40.0)})

    # Assert
    p = ref["foreground_intensity_properties_per_channel"]["0"]
    assert p["mean"] == 15.0 and p["std"] == 2.0
    assert (p["min"], p["max"]) == (-5.0, 40.0)
    assert p["percentile_99_5"] == 25.0
    assert len(ref["spacings"]) == 4


# ------------------------------------------------------------------ against numpy on pooled samples

@pytest.mark.parametrize("integer", [True, False])
def test_merge_equals_numpy_on_concatenated_samples(integer):
    # Prepare: what nnU-Net does on the pooled samples, case by case
    rs = np.random.RandomState(3)
    spc = 500
    sites = {"s1": 4, "s2": 2, "s3": 3}
    total = sum(sites.values())
    all_cases, summaries = [], {}
    for name, n in sites.items():
        cases = []
        for _ in range(n):
            x = rs.standard_t(2, spc) * 200 + rs.uniform(-100, 300)
            cases.append(np.round(x) if integer else x)
        all_cases += cases
        summaries[name] = _site(cases, total, spc)
    census = fp.merge_census({k: {"num_cases": v, "num_channels": 1} for k, v in sites.items()})
    pooled = np.concatenate([np.asarray(c, np.float32) for c in all_cases])

    # Execute
    p = fp.merge_summaries(summaries, census)["foreground_intensity_properties_per_channel"]["0"]

    # Assert
    q005, med, q995 = np.percentile(pooled, fp.PERCENTILES)
    assert [p["percentile_00_5"], p["median"], p["percentile_99_5"]] == [q005, med, q995]
    assert (p["min"], p["max"]) == (pooled.min(), pooled.max())
    assert p["mean"] == pytest.approx(pooled.astype(np.float64).mean(), rel=1e-12)
    assert p["std"] == pytest.approx(pooled.astype(np.float64).std(), rel=1e-12)


def test_empty_case_promotes_percentiles_to_float64_like_nnunet():
    # Prepare: nnU-Net concatenates [] (float64) for a case without foreground
    summaries = {"a": _site([[1.1, 2.2], []], 3, 2), "b": _site([[3.3, 7.7]], 3, 2)}
    census = {"total_cases": 3, "num_channels": 1, "sites": {"a": 2, "b": 1}}
    pooled = np.concatenate([np.float32([1.1, 2.2]), [], np.float32([3.3, 7.7])])

    # Execute
    p = fp.merge_summaries(summaries, census)["foreground_intensity_properties_per_channel"]["0"]

    # Assert
    assert summaries["a"]["sample_dtype"] == "float64"
    assert [p["percentile_00_5"], p["median"], p["percentile_99_5"]] == list(np.percentile(pooled, fp.PERCENTILES))


def test_binned_tables_stay_within_documented_bound():
    # Prepare: far more distinct values than the exact-table limit
    rs = np.random.RandomState(5)
    cases = [np.exp(rs.randn(4000)) * 100 for _ in range(3)]
    bits = 10
    summary = _site(cases, 3, 4000, max_exact_values=1000, mantissa_bits=bits)
    census = {"total_cases": 3, "num_channels": 1, "sites": {"a": 3}}
    pooled = np.concatenate([np.float32(c) for c in cases])

    # Execute
    p = fp.merge_summaries({"a": summary}, census)["foreground_intensity_properties_per_channel"]["0"]

    # Assert
    assert summary["channels"][0]["mantissa_bits"] == bits
    for k, q in zip(("percentile_00_5", "median", "percentile_99_5"), np.percentile(pooled, fp.PERCENTILES)):
        assert abs(p[k] - q) <= 2.0 ** -(bits + 1) * abs(q) * 1.0001, k
    assert p["mean"] == pytest.approx(pooled.astype(np.float64).mean(), rel=1e-12)


# ------------------------------------------------------------------ rejection of bad documents

def _good() -> dict:
    return _site([[1, 3], [2, 5]], 4, 2)


def _set(path, value):
    def mutate(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return mutate


@pytest.mark.parametrize("mutate,reason", [
    (_set(("channels", 0, "counts", 0), -1), "counts must be positive"),
    (_set(("channels", 0, "count"), -2), "at least 0"),
    (_set(("num_cases",), -1), "at least 1"),
    (_set(("channels", 0, "mean"), float("nan")), "NaN and Inf"),
    (_set(("channels", 0, "m2"), float("inf")), "NaN and Inf"),
    (_set(("channels", 0, "values", 1), float("nan")), "NaN and Inf"),
    (_set(("cases", "spacings"), [[1.0, 1.0]]), "inconsistent list lengths"),
    (_set(("channels", 0, "counts"), [1, 1]), "inconsistent list lengths"),
    (_set(("cases", "shapes_after_crop", 0), [10]), "inconsistent list lengths"),
    (lambda d: d["channels"].append(copy.deepcopy(d["channels"][0])), "wrong channel count"),
    (_set(("channels", 0, "count"), 6), "multiple of samples_per_case"),
    (_set(("channels", 0, "m2"), -1.0), "cannot be negative"),
    (_set(("sample_dtype",), "int64"), "sample_dtype"),
    (_set(("cases", "relative_sizes_after_cropping", 0), 1.5), "outside"),
    (_set(("channels", 0, "mantissa_bits"), 99), "mantissa_bits"),
    (lambda d: d.pop("cases"), "missing field 'cases'"),
])
def test_bad_summaries_are_rejected_with_the_reason(mutate, reason):
    # Prepare
    doc = _good()
    fp.validate_summary(doc, "summary of site X", n_channels=1)
    mutate(doc)

    # Execute / Assert
    with pytest.raises(SchemaError, match=reason) as err:
        fp.validate_summary(doc, "summary of site X", n_channels=1)
    assert "summary of site X" in str(err.value)


@pytest.mark.parametrize("census", [{"num_cases": 0, "num_channels": 1}, {"num_cases": True, "num_channels": 1},
                                    {"num_channels": 1}, {"num_cases": 2, "num_channels": -1}, []])
def test_bad_census_is_rejected(census):
    with pytest.raises(SchemaError, match="census of Y"):
        fp.validate_census(census, "census of Y")


def test_merge_rejects_summary_for_another_census():
    # Prepare: the site sampled for 4 federation cases, the census says 5
    census = {"total_cases": 5, "num_channels": 1, "sites": {"x": 2, "y": 3}}
    summaries = {"x": _good(), "y": _site([[1, 1], [2, 2], [3, 3]], 5, 2)}

    # Execute / Assert
    with pytest.raises(ValidationError, match="site 'x'.*4 federation cases"):
        fp.merge_summaries(summaries, census)


# ------------------------------------------------------------------ plans

def _plans(name="Dataset001_A", patch=(64, 64), bs=12, mean=1.0) -> dict:
    return {"dataset_name": name, "plans_name": "nnUNetPlans",
            "foreground_intensity_properties_per_channel": {"0": {"mean": mean}},
            "configurations": {
                "3d_fullres": {"patch_size": [32, *patch], "batch_size": 2, "spacing": [1.0, 1.0, 1.0],
                               "architecture": {"network_class_name": "PlainConvUNet",
                                                "arch_kwargs": {"n_stages": 2, "features_per_stage": [32, 64],
                                                                "kernel_sizes": [[3, 3, 3]] * 2,
                                                                "strides": [[1, 1, 1], [2, 2, 2]]}}},
                "3d_cascade_fullres": {"inherits_from": "3d_fullres", "batch_size": bs}}}


def test_plans_digest_ignores_dataset_name_only():
    assert pl.plans_digest(_plans("Dataset001_A")) == pl.plans_digest(_plans("Dataset002_B"))
    assert pl.plans_digest(_plans()) != pl.plans_digest(_plans(patch=(64, 48)))


def test_diff_plans_names_differing_fields():
    # Execute
    diff = pl.diff_plans(_plans(patch=(64, 64), bs=12), _plans("Other", patch=(64, 48), bs=6, mean=1.0 + 1e-9))

    # Assert
    assert diff == ["configurations.3d_cascade_fullres.batch_size", "configurations.3d_fullres.patch_size[2]",
                    "foreground_intensity_properties_per_channel.0.mean"]
    assert "foreground_intensity_properties_per_channel.0.mean" not in pl.diff_plans(
        _plans(), _plans(mean=1.0 + 1e-9), rel_tol=1e-6)


def test_plans_summary_resolves_inheritance():
    s = pl.plans_summary(_plans(bs=6), "3d_cascade_fullres")
    assert s["batch_size"] == 6 and s["patch_size"] == [32, 64, 64]
    assert s["n_stages"] == 2 and s["features_per_stage"] == [32, 64]
    assert s["strides"] == [[1, 1, 1], [2, 2, 2]]
    with pytest.raises(ValidationError, match="no configuration '2d'"):
        pl.plans_summary(_plans(), "2d")
