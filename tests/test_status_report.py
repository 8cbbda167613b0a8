"""``fedfs status`` and ``fedfs report`` on small toy federations, and the report in a real browser.

Two federations are built once per module with :class:`fedfs.testing.toy.ToyWork` (seconds): a
synchronous FFE one with 3 rounds, into which a forged update and a corrupted heartbeat
are slipped, and an AsymFedAvg one whose sites have different depths. The report is
rendered by headless Chromium (Debian's ``chromium``, installed by ``make test``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedfs import layout
from fedfs.roles.aggregator import Aggregator
from fedfs.cli import main
from fedfs.protocol.documents import canonical_json
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import BlobRef, UpdateManifest
from fedfs.trust.signing import generate_keypair, load_identity
from fedfs.roles.site import Site
from fedfs.testing.toy import ToyWork

CHROMIUM = "/usr/bin/chromium"
FFE_PLOTS = {"plot-train-loss", "plot-pseudo-dice", "plot-staleness", "plot-round-durations", "plot-cases"}
ASYM_PLOTS = FFE_PLOTS | {"plot-sharing"}


class DiceToy(ToyWork):
    """ToyWork that also reports a validation pseudo-Dice and an epoch time, as nnU-Net sites do."""

    def train_round(self, global_path: str, epochs: int, update_path: str) -> dict[str, float]:
        import torch

        t0 = time.perf_counter()
        metrics = super().train_round(global_path, epochs, update_path)
        x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(99))
        target = (x > 0.1 * self.seed)[:, 0]
        with torch.no_grad():
            pred = self.model(x).argmax(1).bool()
        dice = 2 * (pred & target).sum() / (pred.sum() + target.sum()).clamp(min=1)
        return {**metrics, "pseudo_dice": float(dice), "epoch_time_s": (time.perf_counter() - t0) / epochs}


def _federation(root: Path, **settings):
    keys = root / "keys"
    generate_keypair("agg", "aggregator", keys)
    for s in "ABC":
        generate_keypair(s, "site", keys)
    config, agg = config_from_key_dir(keys, ["A", "B", "C"], **settings)
    fed, _ = Federation.create(str(root / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), root / "agg")
    depth_b = 3 if settings.get("mode") == "asym" else 2
    works = {"A": DiceToy("A", cases=6, seed=1), "B": DiceToy("B", cases=3, seed=2, depth=depth_b),
             "C": DiceToy("C", cases=1, seed=3)}
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), w, root / f"site-{s}") for s, w in works.items()}
    return fed, keys, aggregator, sites


def _drive(aggregator, sites, max_steps=100):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a busy machine
    try:
        for _ in range(max_steps):
            if all(s.state.finished for s in sites.values()):
                return
            aggregator.step()
            for name in sorted(sites):
                sites[name].step()
    finally:
        torch.set_num_threads(threads)
    raise AssertionError("federation did not finish")


FORGED = layout.site_update("C", 3)


@pytest.fixture(scope="module")
def ffe(tmp_path_factory):
    """Sync FFE, 3 rounds; a forged update for C (signed by A) and a corrupted heartbeat of B."""
    root = tmp_path_factory.mktemp("ffe")
    fed, keys, aggregator, sites = _federation(root, rounds=3)
    # the aggregator reaches C's r3 once C's r0-r2 are in, rejects it, and carries on
    a = load_identity(keys / "A.key")
    forged = UpdateManifest(site="A", round=3, base_version=2, num_cases=6,
                            blob=BlobRef(key=layout.site_blob("A", "0" * 64), sha256="0" * 64, size=1))
    fed.store.write_bytes(FORGED, canonical_json(a.sign(forged.to_dict())))
    _drive(aggregator, sites)
    hb = fed.store.read_bytes(layout.site_heartbeat("B")).replace(b'"phase":"done"', b'"phase":"oops"')
    fed.store.write_bytes(layout.site_heartbeat("B"), hb)
    return fed


@pytest.fixture(scope="module")
def asym(tmp_path_factory):
    root = tmp_path_factory.mktemp("asym")
    fed, _, aggregator, sites = _federation(root, rounds=2, mode="asym", align="name")
    _drive(aggregator, sites)
    return fed


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# ---- status -------------------------------------------------------------------------------
def test_status_json_ffe(ffe):
    d = json.loads(cli("status", ffe.store.url, "--json", "--federation-digest", ffe.digest))
    assert d["federation"]["mode"] == "ffe" and d["federation"]["aggregation"] == "sync"
    assert d["federation"]["rounds"] == 3
    g = d["global"]
    assert g["version"] == 3 and g["final"] is True
    assert [(c["site"], c["round"], c["weight"], c["staleness"]) for c in g["contributions"]] == \
        [("A", 2, 6.0, 0), ("B", 2, 3.0, 0), ("C", 2, 1.0, 0)]
    sites = d["sites"]
    assert sites["A"]["phase"] == "done" and sites["C"]["phase"] == "done"
    for s in "ABC":
        assert sites[s]["trained_from"] == 2 and sites[s]["staleness"] == 1
        assert sites[s]["last_update"]["round"] == 2 and sites[s]["last_update"]["aggregated"]
        m = sites[s]["metrics"]
        assert m["train_loss"] > 0 and 0 <= m["pseudo_dice"] <= 1 and m["epoch_time"] > 0
        assert s == "B" or 0 <= sites[s]["heartbeat_age_s"] < 600
    # the forged update: rejected by the aggregator, with its reason, under site C
    (rej,) = sites["C"]["rejected"]
    assert rej["key"] == FORGED and rej["by"] == "agg"
    assert "only site 'C' may write here" in rej["reason"] and "signed by site 'A'" in rej["reason"]
    assert sites["A"]["rejected"] == [] and sites["B"]["rejected"] == []
    # files status itself cannot verify are problems, not crashes
    problems = {p["key"]: p["error"] for p in d["problems"]}
    assert "does not verify" in problems[layout.site_heartbeat("B")]
    assert "only site 'C' may write here" in problems[FORGED]
    assert sites["B"]["phase"] == "unknown (heartbeat does not verify)" and sites["B"]["heartbeat_age_s"] is None
    assert d["setup"] == {"census": True, "global_fingerprint": True, "plans_identical": True}


def test_status_reads_a_bounded_number_of_files(ffe):
    from fedfs.ops.status import collect_status

    store = ffe.store
    calls = {"list": 0, "read": 0}
    real_list, real_read = store.list, store.read_bytes
    store.list = lambda *a, **k: (calls.__setitem__("list", calls["list"] + 1), real_list(*a, **k))[1]
    store.read_bytes = lambda *a, **k: (calls.__setitem__("read", calls["read"] + 1), real_read(*a, **k))[1]
    try:
        collect_status(ffe)
    finally:
        store.list, store.read_bytes = real_list, real_read
    assert calls["list"] == 0  # no listing: cost does not grow with history
    assert calls["read"] <= 4 + 6 * 3  # hint, global, census (weight shares), status; per site: 6


def test_status_table_names_every_site(ffe):
    out = cli("status", ffe.store.url)
    rows = {m.group(1) for m in re.finditer(r"^│ (\w+)\s+│", out, re.M)}
    assert {"A", "B", "C"} <= rows
    assert "global v3 (final)" in out
    assert "only site 'C' may write here" in out
    assert "Files that do not verify" in out


def test_status_asym_and_cli_errors(asym, tmp_path):
    d = json.loads(cli("status", asym.store.url, "--json"))
    assert d["federation"]["mode"] == "asym" and d["global"]["version"] == 2 and d["global"]["final"]
    assert d["problems"] == [] and all(s["phase"] == "done" for s in d["sites"].values())
    result = CliRunner().invoke(main, ["status", asym.store.url, "--federation-digest", "0" * 64])
    assert result.exit_code != 0 and "differs from the pinned" in str(result.exception)


# ---- report -------------------------------------------------------------------------------
class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, dict[str, str]] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("id"):
            self.images[a["id"]] = a
        for attr in ("src", "href"):
            if a.get(attr) and not a[attr].startswith(("data:", "#")):
                self.external.append(f"{tag} {attr}={a[attr][:60]}")


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium not installed: run make test (it installs it)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _decode_png(data_uri: str) -> np.ndarray:
    import matplotlib.image as mpimg

    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix)
    return mpimg.imread(io.BytesIO(base64.b64decode(data_uri[len(prefix):])), format="png")


def _check_report_in_browser(html_path: Path, expected: set[str], tmp_path: Path) -> str:
    page = html_path.read_text()
    # self-contained: nothing is fetched from anywhere
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    # the browser's DOM: every plot is an <img> carrying an embedded PNG that is not blank
    dom = _chromium("--dump-dom", html_path.as_uri(), profile=tmp_path / "profile-dom").stdout
    parser = _Images()
    parser.feed(dom)
    assert not parser.external, parser.external
    assert expected <= set(parser.images), f"missing plots: {expected - set(parser.images)}"
    for pid in expected:
        img = parser.images[pid]
        assert img.get("alt"), f"{pid} has no alt text"
        pixels = _decode_png(img["src"])
        assert pixels.shape[0] > 100 and pixels.shape[1] > 200
        assert float(pixels[..., :3].var()) > 0, f"{pid} is blank"
        assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.005, f"{pid} has almost nothing drawn"
    # and the rendered page is not blank either
    shot = tmp_path / f"{html_path.stem}.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", html_path.as_uri(),
              profile=tmp_path / "profile-shot")
    import matplotlib.image as mpimg

    screen = mpimg.imread(str(shot))[..., :3]
    assert screen.shape[:2] == (2400, 1280)
    assert float(screen.var()) > 0.001
    assert len(np.unique((screen * 255).astype(np.uint8).reshape(-1, 3)[::97], axis=0)) > 50
    return dom


def test_report_ffe_in_headless_chromium(ffe, tmp_path):
    out = tmp_path / "report.html"
    assert "wrote" in cli("report", ffe.store.url, "-o", str(out))
    dom = _check_report_in_browser(out, FFE_PLOTS, tmp_path)
    assert "plot-sharing" not in dom  # FFE averages everything: no sharing section
    for text in ("Federated training report", "Finished", "Data fingerprint", "Median spacing",
                 "Foreground intensity per channel", "All sites hold identical plans", "ToyPlans"):
        assert text in dom, text
    assert FORGED in dom and "only site" in dom  # the rejected file, with its reason
    assert dom.count("<span class=\"pill ok\">in v") == 9  # 3 sites x 3 rounds aggregated


def test_report_asym_shows_layer_sharing(asym, tmp_path):
    from fedfs.ops.report import collect_history

    out = tmp_path / "asym.html"
    cli("report", asym.store.url, "-o", str(out))
    dom = _check_report_in_browser(out, ASYM_PLOTS, tmp_path)
    assert "Layers AsymFedAvg shares" in dom and "AsymFedAvg: no fingerprint is merged. Each site plans from its own" in dom
    d = collect_history(asym)
    share = d["globals"][-1]["report"]["sharing"]
    assert share["B"]["shared_params"] < share["B"]["params"] and share["A"]["shared_params"] == share["A"]["params"]
    # the layer table: B's extra (deepest) layer is its own, the first one shared by all
    modules = d["layers"]["modules"]
    assert modules["0"] == {"A": "shared", "B": "shared", "C": "shared"}
    assert "own" in {m.get("B") for m in modules.values()}
