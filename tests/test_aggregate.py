"""Aggregation rules on hand-computed tensors, order independence, and rejection of bad updates."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedfs.weights.combine as aggregate_module
from fedfs.errors import ConfigError, ValidationError
from fedfs.fl.aggregate import FedAsync, FedAvg, FedBuff, Staleness, Update, accept, number_sources, output_groups
from fedfs.fl.combination import plan
from fedfs.weights.combine import CHUNK_ELEMS, aggregate, aggregate_asym, extract_site
from fedfs.weights.tensors import load_weights, save_weights


@pytest.fixture
def put(tmp_path):
    """put(name, cases=None, **tensors) -> path of a safetensors file holding ``tensors``."""
    def _put(name: str, cases: int | None = None, dtype=torch.float32, **tensors) -> str:
        path = tmp_path / f"{name}.safetensors"
        state = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype) for k, v in tensors.items()}
        save_weights(path, state, {"num_cases": str(cases)} if cases is not None else {})
        return str(path)
    return _put


def read(path: str) -> dict[str, list]:
    return {k: v.tolist() for k, v in load_weights(path)[0].items()}


# ---- FedAvg --------------------------------------------------------------------
def test_fedavg_weights_by_training_cases(put, tmp_path):
    # Prepare
    a = put("a", cases=1, w=[1.0, 2.0], b=[[4.0]])
    b = put("b", cases=3, w=[3.0, 4.0], b=[[8.0]])
    # Execute
    result = aggregate([Update("A", a), Update("B", b)], tmp_path / "out.safetensors")
    # Assert: (1*x_a + 3*x_b) / 4
    assert read(result.path) == {"w": [2.5, 3.5], "b": [[7.0]]}
    assert [(c.site, c.weight) for c in result.contributions] == [("A", 1.0), ("B", 3.0)]
    assert (result.tensors, result.params, result.rejected) == (2, 3, ())


def test_fedavg_uniform_and_explicit_case_counts(put, tmp_path):
    a, b = put("a", cases=1, w=[1.0, 2.0]), put("b", cases=3, w=[3.0, 4.0])
    uniform = aggregate([Update("A", a), Update("B", b)], tmp_path / "u.safetensors", rule=FedAvg("uniform"))
    explicit = aggregate([Update("A", a, num_cases=3), Update("B", b, num_cases=1)], tmp_path / "e.safetensors")
    assert read(uniform.path) == {"w": [2.0, 3.0]}
    assert read(explicit.path) == {"w": [1.5, 2.5]}


def test_fedavg_rejects_an_update_for_another_base_version(put, tmp_path):
    a, b = put("a", cases=1, w=[1.0]), put("b", cases=1, w=[3.0])
    result = aggregate([Update("A", a, base_version=4), Update("B", b, base_version=3)],
                       tmp_path / "o.safetensors", version=4)
    assert read(result.path) == {"w": [1.0]}
    assert result.rejected[0].site == "B" and "base version 3" in result.rejected[0].reason


def test_integer_buffers_take_the_maximum_and_mixed_float_dtypes_average_in_float32(put, tmp_path):
    a = put("a", cases=1, w=torch.tensor([1.0, 2.0]), n=torch.tensor(5))
    b = put("b", cases=3, w=torch.tensor([3.0, 4.0], dtype=torch.bfloat16), n=torch.tensor(7))
    out = load_weights(aggregate([Update("A", a), Update("B", b)], tmp_path / "o.safetensors").path)[0]
    assert out["n"].dtype == torch.int64 and out["n"].item() == 7
    assert out["w"].dtype == torch.float32 and out["w"].tolist() == [2.5, 3.5]


# ---- FedBuff -------------------------------------------------------------------
@pytest.mark.parametrize("staleness, s", [
    (Staleness("constant"), 1.0),
    (Staleness("sqrt"), 0.5),                      # 1/sqrt(1+3)
    (Staleness("polynomial", a=0.5), 0.5),         # (3+1)^-0.5
    (Staleness("hinge", a=1.0, b=2.0), 0.5),       # 1/(1*(3-2)+1)
])
def test_fedbuff_scales_a_stale_delta_by_each_staleness_function(put, tmp_path, staleness, s):
    # Prepare: global v4 = [1, 1]; the update started from v1 = [0, 0] (tau = 3)
    g, base = put("g", w=[1.0, 1.0]), put("v1", w=[0.0, 0.0])
    x = put("x", cases=5, w=[2.0, 4.0])
    # Execute
    result = aggregate([Update("A", x, base_version=1, base_path=base)], tmp_path / "o.safetensors",
                       rule=FedBuff(staleness=staleness), global_path=g, version=4)
    # Assert: G + s * (x - B)
    assert read(result.path) == {"w": [1.0 + s * 2.0, 1.0 + s * 4.0]}
    assert (result.contributions[0].staleness, result.contributions[0].scale) == (3, s)


def test_staleness_functions_by_hand():
    assert Staleness("constant")(7) == 1.0
    assert Staleness("sqrt")(0) == 1.0 and Staleness("sqrt")(8) == pytest.approx(1 / 3)
    assert Staleness("polynomial", a=2.0)(1) == 0.25
    hinge = Staleness("hinge", a=1.0, b=2.0)
    assert (hinge(0), hinge(2), hinge(4)) == (1.0, 1.0, pytest.approx(1 / 3))
    with pytest.raises(ConfigError):
        Staleness("linear")


def test_fedbuff_mixes_fresh_and_stale_updates(put, tmp_path):
    # Prepare: G=[1,1]; A (1 case) from G itself; B (3 cases) from v2=[0,0]; eta=1, s=1
    g, v2 = put("g", w=[1.0, 1.0]), put("v2", w=[0.0, 0.0])
    a, b = put("a", cases=1, w=[3.0, 1.0]), put("b", cases=3, w=[1.0, 5.0])
    ups = [Update("A", a, base_version=4, base_path=g), Update("B", b, base_version=2, base_path=v2)]
    # Execute
    result = aggregate(ups, tmp_path / "o.safetensors", rule=FedBuff(staleness=Staleness("constant")),
                       global_path=g, version=4)
    # Assert: G + (1*([3,1]-[1,1]) + 3*([1,5]-[0,0])) / 4 = [1,1] + [5,15]/4
    assert read(result.path) == {"w": [2.25, 4.75]}


def test_fedbuff_rejects_updates_staler_than_max_staleness_and_goes_on(put, tmp_path):
    g, v0 = put("g", w=[1.0]), put("v0", w=[0.0])
    fresh, stale = put("fresh", cases=1, w=[3.0]), put("stale", cases=1, w=[9.0])
    result = aggregate([Update("S", stale, base_version=0, base_path=v0), Update("F", fresh, base_version=5)],
                       tmp_path / "o.safetensors", rule=FedBuff(max_staleness=4), global_path=g, version=5)
    assert read(result.path) == {"w": [3.0]}
    reasons = [(r.site, r.reason.split(": ")[-1]) for r in result.rejected]
    assert reasons == [("S", "staleness 5 exceeds max_staleness 4")]


def test_fedbuff_rejects_a_future_base_and_a_missing_base_file(put, tmp_path):
    g, x = put("g", w=[1.0]), put("x", cases=1, w=[3.0])
    result = aggregate([Update("A", x, base_version=5), Update("B", x, base_version=9),
                        Update("C", x, base_version=2)], tmp_path / "o.safetensors", rule=FedBuff(),
                       global_path=g, version=5)
    reasons = {r.site: r.reason for r in result.rejected}
    assert "newer than the current 5" in reasons["B"] and "base global version 2 is not available" in reasons["C"]


def test_synchronous_fedbuff_is_fedavg_byte_for_byte(put, tmp_path):
    # Prepare: awkward case counts so that w_i / W is not exact
    gen = torch.Generator().manual_seed(0)
    g = put("g", w=torch.randn(5, 7, generator=gen), b=torch.randn(3, generator=gen))
    sites = [put(f"s{i}", cases=c, w=torch.randn(5, 7, generator=gen), b=torch.randn(3, generator=gen))
             for i, c in enumerate([3, 5, 7])]
    ups = [Update(f"s{i}", p, base_version=6) for i, p in enumerate(sites)]
    # Execute
    avg = aggregate(ups, tmp_path / "avg.safetensors", version=6)
    buff = aggregate(ups, tmp_path / "buff.safetensors", rule=FedBuff(eta=1.0), global_path=g, version=6)
    # Assert
    assert open(avg.path, "rb").read() == open(buff.path, "rb").read()



def test_the_plan_is_made_from_headers_alone():
    # Prepare: plain header data, no files; G and B=v2 hold one tensor each, A and B were trained on 1 and 3 cases
    def header(path, **meta):
        return SimpleNamespace(path=path, metadata=meta,
                               tensors={"w": SimpleNamespace(dtype="F32", shape=(2,), start=8 + len(path), numel=2)},
                               shapes=lambda: {"w": (2,)})
    rule = FedBuff(staleness=Staleness("constant"))
    glob, v2 = header("g"), header("v2")
    accepted = [accept(Update("A", "a", base_version=4), header("a", num_cases="1"), rule, 4),
                accept(Update("B", "b", base_version=2), header("b", num_cases="3"), rule, 4)]
    for a in accepted:
        a.groups = output_groups(a.info.shapes(), None)
    # Execute
    bases, first = number_sources(accepted, {2: v2})
    outs, conflicts = plan(rule, glob, bases, accepted, first)
    # Assert: G: 1 - 1/4 (A's own base is G), v2: -3/4, A: 1/4, B: 3/4, by source index
    assert (first, conflicts) == (2, [])
    assert [(t.src, t.coef) for t in outs[0].terms] == [(0, 0.75), (1, -0.75), (2, 0.25), (3, 0.75)]


# ---- FedAsync ------------------------------------------------------------------
def test_fedasync_mixes_each_update_into_the_global(put, tmp_path):
    # Prepare
    g = put("g", w=[0.0, 4.0])
    a, b = put("a", w=[4.0, 0.0]), put("b", w=[8.0, 8.0])
    rule = FedAsync(alpha=0.5, staleness=Staleness("constant"))
    # Execute
    one = aggregate([Update("A", a, base_version=2)], tmp_path / "1.safetensors", rule=rule, global_path=g, version=2)
    two = aggregate([Update("B", b, base_version=2), Update("A", a, base_version=2)], tmp_path / "2.safetensors",
                    rule=rule, global_path=g, version=2)
    stale = aggregate([Update("A", a, base_version=0)], tmp_path / "3.safetensors",
                      rule=FedAsync(alpha=1.0), global_path=g, version=3)
    # Assert: x = (1 - a) x + a x_new, in site order; sqrt staleness at tau=3 gives a = 0.5
    assert read(one.path) == {"w": [2.0, 2.0]}
    assert read(two.path) == {"w": [5.0, 5.0]}  # 0.25 G + 0.25 A + 0.5 B
    assert read(stale.path) == {"w": [2.0, 2.0]}


# ---- AsymFedAvg ----------------------------------------------------------------
def _asym_sites(put):
    a = put("a", cases=1, **{"encoder.stages.0.w": [0.0, 4.0], "decoder.stages.0.w": [0.0, 0.0, 0.0],
                             "decoder.stages.1.w": [4.0, 8.0]})
    b = put("b", cases=3, **{"encoder.stages.0.w": [4.0, 8.0], "decoder.stages.0.w": [9.0] * 4,
                             "decoder.stages.1.w": [4.0, 4.0, 4.0], "decoder.stages.2.w": [0.0, 4.0]})
    return a, b


def test_asym_fedavg_averages_by_resolution_level_and_returns_each_site_its_keys(put, tmp_path):
    # Prepare: A's decoder stage 0/1 sit at levels 1/0, B's stage 1/2 sit there too; B's stage 0 is its own
    a, b = _asym_sites(put)
    outs = {"A": tmp_path / "A.out.safetensors", "B": tmp_path / "B.out.safetensors"}
    # Execute
    result, files = aggregate_asym([Update("B", b), Update("A", a)], tmp_path / "union.safetensors", outs)
    # Assert
    assert read(outs["A"]) == {"encoder.stages.0.w": [3.0, 7.0], "decoder.stages.0.w": [3.0, 3.0, 3.0],
                               "decoder.stages.1.w": [1.0, 5.0]}
    assert read(outs["B"]) == {"encoder.stages.0.w": [3.0, 7.0], "decoder.stages.0.w": [9.0] * 4,
                               "decoder.stages.1.w": [3.0, 3.0, 3.0], "decoder.stages.2.w": [1.0, 5.0]}
    share = result.sharing
    assert (share["A"].tensors, share["A"].shared_tensors, share["A"].shared_params) == (3, 3, 7)
    assert (share["B"].tensors, share["B"].params, share["B"].shared_tensors, share["B"].shared_params) == (4, 11, 3, 7)
    assert (files["A"].from_global, files["B"].from_global) == (3, 4)
    assert "decoder.stages.r2.w[4]" in read(result.path)


def test_asym_by_name_shares_only_what_matches_by_name(put, tmp_path):
    a, b = _asym_sites(put)
    outs = {"A": tmp_path / "A.out.safetensors"}
    result, _ = aggregate_asym([Update("A", a), Update("B", b)], tmp_path / "u.safetensors", outs, align="name")
    assert read(outs["A"]) == {"encoder.stages.0.w": [3.0, 7.0], "decoder.stages.0.w": [0.0, 0.0, 0.0],
                               "decoder.stages.1.w": [4.0, 8.0]}
    assert result.sharing["A"].shared_tensors == 1


def test_asym_composes_with_fedbuff_and_extract_falls_back_to_own_weights(put, tmp_path):
    # Prepare: the union global v3 holds level 0 and the encoder; A updates from it (tau = 0)
    union = put("union", **{"encoder.stages.0.w[2]": [1.0, 1.0], "decoder.stages.r0.w[2]": [1.0, 1.0]})
    a = put("a", cases=2, **{"encoder.stages.0.w": [3.0, 5.0], "decoder.stages.0.w": [2.0, 2.0]})
    new = tmp_path / "new.safetensors"
    # Execute
    aggregate([Update("A", a, base_version=3)], new, rule=FedBuff(eta=0.5), global_path=union, version=3,
              align="level")
    c = put("c", **{"encoder.stages.0.w": [7.0, 7.0], "decoder.stages.0.w": [7.0, 7.0, 7.0]})
    got = extract_site(new, {"encoder.stages.0.w": (2,), "decoder.stages.0.w": (3,)}, tmp_path / "c.out.safetensors",
                       fallback_path=c)
    # Assert: G + 0.5 (x - G)
    assert read(new) == {"encoder.stages.0.w[2]": [2.0, 3.0], "decoder.stages.r0.w[2]": [1.5, 1.5]}
    assert read(got.path) == {"encoder.stages.0.w": [2.0, 3.0], "decoder.stages.0.w": [7.0, 7.0, 7.0]}
    assert (got.from_global, got.from_fallback) == (1, 1)


# ---- determinism and streaming -----------------------------------------------------------
def test_outputs_are_byte_identical_for_any_arrival_order(put, tmp_path):
    # Prepare
    gen = torch.Generator().manual_seed(1)
    g, v1 = put("g", w=torch.randn(40, generator=gen)), put("v1", w=torch.randn(40, generator=gen))
    paths = [put(f"s{i}", cases=i + 2, w=torch.randn(40, generator=gen)) for i in range(4)]
    ups = [Update(f"s{i}", p, base_version=1 + i % 2, base_path=v1 if i % 2 == 0 else g) for i, p in enumerate(paths)]
    a, b = _asym_sites(put)
    runs = {}
    # Execute
    for order, seq in (("fwd", ups), ("rev", ups[::-1]), ("mix", [ups[2], ups[0], ups[3], ups[1]])):
        runs[order] = [
            aggregate([Update(u.site, u.path) for u in seq], tmp_path / f"avg-{order}.safetensors").path,
            aggregate(seq, tmp_path / f"buff-{order}.safetensors", rule=FedBuff(), global_path=g, version=2).path,
            aggregate([Update("A", a), Update("B", b)][:: 1 if order == "fwd" else -1],
                      tmp_path / f"asym-{order}.safetensors", align="level").path,
        ]
    # Assert
    for i in range(3):
        blobs = {open(r[i], "rb").read() for r in runs.values()}
        assert len(blobs) == 1


@pytest.mark.parametrize("chunk", [CHUNK_ELEMS, 1 << 12])
def test_tensors_larger_than_a_chunk_stream_correctly(put, tmp_path, monkeypatch, chunk):
    # Prepare: one tensor spanning several chunks, small tensors that merge into one run
    monkeypatch.setattr(aggregate_module, "CHUNK_ELEMS", chunk)
    gen = torch.Generator().manual_seed(2)
    n = 2 * chunk + 1234
    states = [{"big": torch.randn(n, generator=gen), "a": torch.randn(3, generator=gen),
               "z": torch.randn(5, generator=gen)} for _ in range(3)]
    paths = [put(f"s{i}", cases=c, **s) for i, (s, c) in enumerate(zip(states, [2, 3, 6]))]
    ups = [Update(f"s{i}", p) for i, p in enumerate(paths)]
    # Execute
    result = aggregate(ups, tmp_path / "o.safetensors", threads=2)
    single = aggregate(ups, tmp_path / "one.safetensors", threads=1)
    # Assert
    assert open(result.path, "rb").read() == open(single.path, "rb").read()
    out = load_weights(result.path)[0]
    for key in states[0]:
        expect = sum(c * s[key].double() for s, c in zip(states, [2, 3, 6])) / 11
        assert np.allclose(out[key].numpy(), expect.numpy(), rtol=1e-6, atol=1e-6)


# ---- rejection -------------------------------------------------------------------
def _raw(path, header: dict, data: bytes, length: int | None = None) -> str:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return str(path)


@pytest.mark.parametrize("kind, reason", [
    ("nan", "tensor 'w' contains NaN"),
    ("inf", "tensor 'w' contains Inf"),
    ("shape", "tensor 'w' has shape [3], expected [2]"),
    ("extra", "unexpected tensor 'v'"),
    ("missing", "missing tensor 'w'"),
    ("dtype", "dtype 'I32'"),
    ("kind", "tensor 'w' is I64[2], the aggregate holds F32[2]"),
    ("truncated", "truncated"),
    ("header", "exceeds the"),
    ("pickle", "zip archive"),
])
def test_a_bad_update_is_rejected_with_its_reason_and_the_rest_is_aggregated(put, tmp_path, kind, reason):
    # Prepare
    good = [put("g1", cases=1, w=[1.0, 2.0], b=[1.0]), put("g2", cases=3, w=[3.0, 4.0], b=[1.0])]
    path = tmp_path / "bad.safetensors"
    if kind in ("nan", "inf"):
        put("bad", cases=1, w=[1.0, math.nan if kind == "nan" else -math.inf], b=[1.0])
    elif kind == "shape":
        put("bad", cases=1, w=[1.0, 2.0, 3.0], b=[1.0])
    elif kind == "extra":
        put("bad", cases=1, w=[1.0, 2.0], b=[1.0], v=[0.0])
    elif kind == "missing":
        put("bad", cases=1, b=[1.0])
    elif kind == "dtype":
        _raw(path, {"w": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12))
    elif kind == "kind":
        put("bad", cases=1, w=torch.tensor([1, 2]), b=torch.tensor([1.0]))
    elif kind == "truncated":
        put("bad", cases=1, w=[1.0, 2.0], b=[1.0])
        path.write_bytes(path.read_bytes()[:-3])
    elif kind == "header":
        _raw(path, {}, b"", length=1 << 30)
    else:
        torch.save({"w": torch.zeros(2), "b": torch.zeros(1)}, path)
    ups = [Update("a", good[0]), Update("b", good[1]), Update("z", str(path), num_cases=1)]
    if kind == "shape":
        ups[2] = Update("z", str(path), num_cases=1, expected={"w": (2,), "b": (1,)})
    # Execute
    result = aggregate(ups, tmp_path / "out.safetensors")
    # Assert
    assert read(result.path) == {"w": [2.5, 3.5], "b": [1.0]}
    assert [r.site for r in result.rejected] == ["z"]
    assert reason in result.rejected[0].reason and str(path) in result.rejected[0].reason


def test_no_acceptable_update_raises_with_the_reasons(put, tmp_path):
    bad = put("bad", cases=1, w=[math.nan])
    with pytest.raises(ValidationError, match="no acceptable update.*NaN"):
        aggregate([Update("a", bad)], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_corrupt_global_raises_and_an_overflow_is_reported(put, tmp_path):
    g = put("g", w=[math.inf])
    x = put("x", cases=1, w=[1.0])
    with pytest.raises(ValidationError, match="contains Inf"):
        aggregate([Update("A", x, base_version=1)], tmp_path / "o.safetensors", rule=FedBuff(eta=0.5),
                  global_path=g, version=1)
    # every input finite, yet g + (x - base) overflows float32: the update is rejected alone, named with its peak
    big, low = put("big", w=[3e38]), put("low", w=[-3e38])
    with pytest.raises(ValidationError, match="no acceptable update.*big.safetensors.*make the aggregate overflow F32"):
        aggregate([Update("A", big, num_cases=1, base_version=0, base_path=low)], tmp_path / "o.safetensors",
                  rule=FedBuff(staleness=Staleness("constant")), global_path=big, version=1)


def test_async_rules_need_the_global_and_its_version(put, tmp_path):
    x = put("x", cases=1, w=[1.0])
    with pytest.raises(ConfigError):
        aggregate([Update("A", x)], tmp_path / "o.safetensors", rule=FedBuff())
    with pytest.raises(ConfigError):
        aggregate([Update("A", x)], tmp_path / "o.safetensors", align="fuzzy")
