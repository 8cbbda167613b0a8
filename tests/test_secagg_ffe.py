"""Secure FFE (fedfs.privacy.secagg_ffe): census and fingerprint histograms merged under secure
aggregation over a folder bucket give plain FFE's merged fingerprint."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fedfs.errors import ValidationError
from fedfs.fl.fingerprint import merge_census, merge_summaries
from fedfs.privacy import secagg_ffe
from fedfs.privacy.secagg_rounds import SecureAggregator, SecureSite, run_session, session_params
from fedfs.testing.toy import ToyWork, toy_federation
from fedfs.trust.signing import load_identity


def secure_sum(fed, tmp_path, names, session, inputs):
    params = session_params(fed.config, session)
    ids = {n: load_identity(tmp_path / "keys" / f"{n}.key") for n in [*names, "agg"]}
    sites = {s: SecureSite(fed.bucket, ids[s], tmp_path / f"w-{s}", params) for s in names}
    agg = SecureAggregator(fed.bucket, ids["agg"], params)
    return run_session(sites, agg, inputs)


def test_secure_ffe_merged_fingerprint_equals_plain_ffe(tmp_path):
    names = ["A", "B", "C"]
    fed, _, _ = toy_federation(tmp_path, names)
    works = {s: ToyWork(s, cases=2 + i, seed=i) for i, s in enumerate(names)}
    # phase 1: the census, summed (no site's case count is published)
    total = secure_sum(fed, tmp_path, names, "ffe-census",
                       {s: secagg_ffe.census_input(w.cases, 1) for s, w in works.items()})
    census = secagg_ffe.pooled_census(total, names)
    plain_census = merge_census({s: {"num_cases": w.cases, "num_channels": 1} for s, w in works.items()})
    assert census["total_cases"] == plain_census["total_cases"] == 9
    # phase 2: histograms on the shared grid, summed; geometry in the clear
    summaries = {s: w.fingerprint_summary(census["total_cases"]) for s, w in works.items()}
    grid = secagg_ffe.IntegerGrid()
    split = {s: secagg_ffe.summary_input(summaries[s], grid) for s in names}
    hist_sum = secure_sum(fed, tmp_path, names, "ffe-summary", {s: split[s][1] for s in names})
    secure = secagg_ffe.merge_secure_fingerprint({s: split[s][0] for s in names}, hist_sum, grid, census)
    plain = merge_summaries(summaries, plain_census)

    props_s = secure.pop("foreground_intensity_properties_per_channel")["0"]
    props_p = plain.pop("foreground_intensity_properties_per_channel")["0"]
    assert secure == plain  # case geometry and median relative size: identical
    for k in ("median", "min", "max", "percentile_00_5", "percentile_99_5"):
        assert props_s[k] == props_p[k], k  # order statistics: bit for bit
    for k in ("mean", "std"):  # float merges: equal up to the last bits of plain's pairwise float merge
        assert props_s[k] == pytest.approx(props_p[k], rel=1e-13, abs=0)
    # ... and the secure mean is the correctly rounded pooled mean
    values = [v for s in names for v in summaries[s]["channels"][0]["values"]]
    counts = [c for s in names for c in summaries[s]["channels"][0]["counts"]]
    exact = Fraction(sum(int(v) * c for v, c in zip(values, counts)), sum(counts))
    assert props_s["mean"] == float(exact)


def test_secure_ffe_step_by_step_over_the_bucket(tmp_path):
    """The set-up phase's hooks (fedfs.privacy.secagg_ffe_rounds), stepped as the roles would."""
    from fedfs.privacy import secagg_ffe_rounds as ffe

    names = ["A", "B", "C", "D"]
    fed, _, _ = toy_federation(tmp_path, names)
    ids = {n: load_identity(tmp_path / "keys" / f"{n}.key") for n in [*names, "agg"]}
    works = {s: ToyWork(s, cases=1 + i, seed=i) for i, s in enumerate(names)}
    census = None
    for _ in range(6):
        for s, w in works.items():
            ffe.site_census_step(fed.bucket, ids[s], tmp_path / f"w-{s}", w.cases, 1)
        what, census = ffe.aggregator_census_step(fed.bucket, ids["agg"])
        if census:
            break
    assert census == {"total_cases": 10, "num_channels": 1, "survivors": names}
    summaries = {s: w.fingerprint_summary(10) for s, w in works.items()}
    geometries = {s: secagg_ffe.summary_input(summaries[s], secagg_ffe.IntegerGrid())[0] for s in names}
    fingerprint = None
    for _ in range(6):
        for s in names:
            ffe.site_summary_step(fed.bucket, ids[s], tmp_path / f"w-{s}", summaries[s])
        what, fingerprint = ffe.aggregator_summary_step(fed.bucket, ids["agg"], geometries, census)
        if fingerprint:
            break
    plain = merge_summaries(summaries, merge_census({s: {"num_cases": w.cases, "num_channels": 1}
                                                     for s, w in works.items()}))
    assert fingerprint["spacings"] == plain["spacings"]
    assert fingerprint["foreground_intensity_properties_per_channel"]["0"]["median"] == \
        plain["foreground_intensity_properties_per_channel"]["0"]["median"]


def test_secure_ffe_refuses_what_an_integer_grid_cannot_hold():
    grid = secagg_ffe.IntegerGrid(-1024, 3071)
    work = ToyWork("A", cases=2)
    summary = work.fingerprint_summary(6)
    summary["channels"][0]["values"] = [v + 0.5 for v in summary["channels"][0]["values"]]
    summary["channels"][0]["min"] += 0.5
    summary["channels"][0]["max"] += 0.5
    summary["channels"][0]["mean"] += 0.5
    with pytest.raises(ValidationError, match="integer intensities in the shared grid"):
        secagg_ffe.summary_input(summary, grid)
    with pytest.raises(ValidationError, match="disagree on the number of image channels"):
        total = {k: a + b for k, a, b in zip(("num_cases", "channels"),
                                               secagg_ffe.census_input(2, 1).values(),
                                               secagg_ffe.census_input(3, 4).values())}
        secagg_ffe.pooled_census(total, ["A", "B"])
    assert np.count_nonzero(grid.histogram([-1024.0, 3071.0], [2, 5], "x")) == 2
