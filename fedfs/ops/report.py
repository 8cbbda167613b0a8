"""``fedfs report``: one self-contained HTML page about a federation, from bucket files only.

:func:`collect_history` reads the whole history (every global and update
manifest, the fingerprint and plans documents, status documents), verifying
each file like any reader; files that do not verify are listed as problems.
:func:`build_report` draws the plots with matplotlib (Agg) as embedded PNGs
and writes one HTML file with no external references, so it can be mailed or
opened on a machine without network access.

What it shows: per-site training loss and validation pseudo-Dice per round,
the staleness of each update, how long each round took (time between global
versions, from the aggregator's signatures), the merged fingerprint (intensity
properties, median spacing, case counts), the plans summary, and which layers
AsymFedAvg averages across sites.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..protocol import layout
from ..errors import FedfsError, NotFound
from ..protocol.timestamps import parse_stamp_or_none as parse_time
from .status import pick_metrics, short_reason

if TYPE_CHECKING:
    from ..federation import Federation

__all__ = ["collect_history", "build_report", "render_html", "PLOT_IDS"]

#: id -> what the plot shows; a plot is left out (with a note) when the bucket has no data for it.
PLOT_IDS = {
    "plot-train-loss": "Training loss per site and round",
    "plot-pseudo-dice": "Validation pseudo-Dice per site and round",
    "plot-staleness": "Staleness of each update when it was aggregated",
    "plot-round-durations": "Time taken by each round (between global versions)",
    "plot-cases": "Training cases per site",
    "plot-sharing": "Parameters AsymFedAvg shares per site",
}
_MAX_INIT_BLOB = 1024**3  # a site's initial weights, read for the layer-sharing table


# ---- collecting ----------------------------------------------------------------------
class _Reader:
    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.problems: list[dict[str, str]] = []

    def read(self, key: str, cls: type) -> Any:
        try:
            return self.fed.bucket.read(key, cls)
        except NotFound:
            return None
        except FedfsError as exc:
            self.problems.append({"key": key, "error": str(exc)})
            return None

    def list(self, prefix: str) -> list[str]:
        try:
            return self.fed.store.list(prefix)
        except NotFound:
            return []
        except FedfsError as exc:
            self.problems.append({"key": prefix, "error": str(exc)})
            return []


def collect_history(fed: Federation, *, layers: bool = True) -> dict[str, Any]:
    """Everything the report shows, as plain data (JSON-ready)."""
    from ..protocol.schema import (Census, GlobalFingerprint, GlobalManifest, Heartbeat, PlansDocument, SiteCensus,
                         StatusDocument, UpdateManifest)

    c = fed.config
    r = _Reader(fed)
    globals_: list[dict[str, Any]] = []
    for key in r.list(layout.GLOBALS_PREFIX):
        v = layout.parse_version_key(key)
        if v is None:
            continue
        g = r.read(key, GlobalManifest)
        if g is None:
            continue
        globals_.append({"version": v, "signed_at": g.signed_at, "t": parse_time(g.signed_at),
                         "final": bool(g.doc.final or v >= c.rounds), "report": g.doc.report,
                         "next_rounds": g.doc.next_rounds,
                         "contributions": [{"site": x.site, "round": x.round, "key": x.key,
                                            "base_version": x.base_version, "staleness": x.staleness,
                                            "weight": x.weight} for x in g.doc.contributions]})
    globals_.sort(key=lambda g: g["version"])
    folded = {x["key"]: (g["version"], x) for g in globals_ for x in g["contributions"]}

    rejected: list[dict[str, str]] = []
    st = r.read(layout.AGG_STATUS, StatusDocument)
    if st is not None:
        rejected += [{"key": x.key, "reason": x.reason, "at": x.at, "by": st.signer} for x in st.doc.rejected]

    updates: list[dict[str, Any]] = []
    sites: dict[str, dict[str, Any]] = {}
    for site in c.site_names:
        for key in r.list(layout.site_updates_prefix(site)):
            parsed = layout.parse_update_key(key)
            if parsed is None:
                continue
            u = r.read(key, UpdateManifest)
            if u is None:
                continue
            into = folded.get(key)
            reason = next((x["reason"] for x in rejected if x["key"] == key), None)
            updates.append({"site": site, "round": u.doc.round, "key": key, "base_version": u.doc.base_version,
                            "num_cases": u.doc.num_cases, "signed_at": u.signed_at, "metrics": u.doc.metrics,
                            "named": pick_metrics(u.doc.metrics),
                            "version": into[0] if into else None,
                            "staleness": into[1]["staleness"] if into else None,
                            "weight": into[1]["weight"] if into else None,
                            "state": "aggregated" if into else ("rejected" if reason else "pending"),
                            "reason": reason})
        hb = r.read(layout.site_heartbeat(site), Heartbeat)
        census = r.read(layout.site_census(site), SiteCensus)
        plans = r.read(layout.site_plans(site), PlansDocument)
        own = r.read(layout.site_status(site), StatusDocument)
        if own is not None:
            rejected += [{"key": x.key, "reason": x.reason, "at": x.at, "by": site} for x in own.doc.rejected]
        sites[site] = {
            "phase": hb.doc.phase if hb else None, "message": hb.doc.message if hb else "",
            "heartbeat_at": hb.signed_at if hb else None,
            "cases": census.doc.num_cases if census else None,
            "plans": None if plans is None else {
                "identifier": plans.doc.plans_identifier, "configuration": plans.doc.configuration,
                "digest": plans.doc.digest, "summary": plans.doc.summary,
                "nnunet_version": plans.doc.nnunet_version,
                "init_blob": plans.doc.init_blob.to_dict() if plans.doc.init_blob else None},
        }
    for u in updates:  # without a census (AsymFedAvg) the update manifests say how many cases
        if sites[u["site"]]["cases"] is None:
            sites[u["site"]]["cases"] = u["num_cases"]

    census = r.read(layout.CENSUS, Census)
    gfp = r.read(layout.GLOBAL_FINGERPRINT, GlobalFingerprint)
    out = {
        "url": fed.store.url, "federation_id": c.federation_id, "federation_digest": fed.digest,
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {"mode": c.mode, "aggregation": c.aggregation, "configuration": c.configuration,
                   "rounds": c.rounds, "local_epochs": c.local_epochs, "aggregator": c.aggregator.name,
                   "sites": c.site_names, "weighting": c.weighting, "align": c.align,
                   "buffer_size": c.k, "buffer_trigger": c.buffer_trigger, "max_staleness": c.max_staleness,
                   "created": c.created},
        "globals": globals_, "updates": updates, "sites": sites, "rejected": rejected,
        "census": None if census is None else {"total_cases": census.doc.total_cases,
                                               "num_channels": census.doc.num_channels, "sites": census.doc.sites},
        "fingerprint": None if gfp is None else fingerprint_summary(gfp.doc.fingerprint, gfp.doc.total_cases,
                                                                    gfp.doc.sites),
        "layers": None,
        "problems": r.problems,
    }
    if layers and c.mode == "asym":
        out["layers"] = _layer_table(fed, sites, r)
    return out


def fingerprint_summary(fp: dict[str, Any], total_cases: int, sites: list[str]) -> dict[str, Any]:
    """Intensity properties per channel, median and range of spacings and shapes of a merged fingerprint."""
    import numpy as np

    def stats(key: str) -> dict[str, list[float]] | None:
        rows = fp.get(key)
        try:
            a = np.asarray(rows, dtype=float)
        except (TypeError, ValueError):
            return None
        if a.ndim != 2 or not len(a):
            return None
        return {"median": np.median(a, axis=0).tolist(), "min": a.min(axis=0).tolist(), "max": a.max(axis=0).tolist()}

    channels = {}
    for ch, props in sorted((fp.get("foreground_intensity_properties_per_channel") or {}).items()):
        if isinstance(props, dict):
            channels[str(ch)] = {k: v for k, v in props.items() if isinstance(v, (int, float))}
    return {"total_cases": total_cases, "sites": sites, "cases_in_fingerprint": len(fp.get("spacings") or []),
            "spacing": stats("spacings"), "shape": stats("shapes_after_crop"), "intensity": channels,
            "median_relative_size_after_cropping": fp.get("median_relative_size_after_cropping")}


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes from a (sha256-verified) safetensors header; never loads tensor data."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 2 <= n <= 16 * 1024 * 1024:
            raise ValueError(f"implausible safetensors header length {n}")
        header = json.loads(fh.read(n))
    return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _layer_table(fed: Federation, sites: dict[str, Any], r: _Reader) -> dict[str, Any] | None:
    """Which layers (modules) of each site's network AsymFedAvg averages with another site's."""
    from ..fl.align import align_sites
    from ..protocol.schema import BlobRef

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedfs-report-") as tmp:
        for site, info in sites.items():
            ref = (info.get("plans") or {}).get("init_blob")
            if not ref or ref["size"] > _MAX_INIT_BLOB:
                continue
            try:
                path = fed.bucket.get_blob_file(BlobRef(**{k: ref[k] for k in ("key", "sha256", "size")}),
                                                os.path.join(tmp, f"{site}.safetensors"))
                shapes[site] = _safetensors_shapes(path)
            except (FedfsError, OSError, ValueError, KeyError, TypeError) as exc:
                r.problems.append({"key": ref.get("key", "?"), "error": f"initial weights of {site}: {exc}"})
    if len(shapes) < 2:
        return None
    align = "level" if fed.config.align == "resolution" else "name"
    try:
        table = align_sites(shapes, align)
    except FedfsError as exc:
        r.problems.append({"key": "layers", "error": str(exc)})
        return None
    flags: dict[str, dict[str, list[bool]]] = {}  # module -> site -> shared? per tensor
    for members in table.values():
        for site, key in members.items():
            module = key.rsplit(".", 1)[0] if "." in key else key
            flags.setdefault(module, {}).setdefault(site, []).append(len(members) > 1)
    rows = {m: {s: "shared" if all(f) else "own" if not any(f) else "partly" for s, f in per.items()}
            for m, per in flags.items()}
    return {"sites": sorted(shapes), "align": align, "modules": dict(sorted(rows.items(), key=lambda kv: _natural(kv[0])))}


def _natural(s: str) -> list[Any]:
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


# ---- plots -----------------------------------------------------------------------------
_CSS_DPI = 96
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _color(sites: list[str], site: str) -> str:
    return _COLORS[sites.index(site) % len(_COLORS)] if site in sites else "#333333"


def _fig(width: float = 6.4, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=_CSS_DPI)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, axis="y", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def _png(fig) -> dict[str, Any]:
    """The figure as a base64 PNG at twice its display resolution (sharp on high-DPI screens)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    width = round(fig.get_size_inches()[0] * _CSS_DPI)
    fig.savefig(buf, format="png", dpi=2 * _CSS_DPI, metadata={"Software": None}, facecolor="white")
    plt.close(fig)
    return {"data": base64.b64encode(buf.getvalue()).decode(), "width": width}


def _metric_plot(d: dict[str, Any], metric: str, ylabel: str, unit_interval: bool = False) -> dict[str, Any] | None:
    from matplotlib.ticker import MaxNLocator

    sites = d["config"]["sites"]
    series = {}
    for s in sites:
        pts = sorted((u["round"] + 1, u["named"][metric]) for u in d["updates"]
                     if u["site"] == s and u["named"].get(metric) is not None)
        if pts:
            series[s] = pts
    if not series:
        return None
    fig, ax = _fig()
    for s, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=2, markersize=5,
                label=s, color=_color(sites, s))
    ax.set_xlabel("Round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if unit_interval:
        lo = min(p[1] for pts in series.values() for p in pts)
        ax.set_ylim(max(0.0, min(lo - 0.05, 0.5)), 1.0)
    _legend(ax)
    return _png(fig)


def _legend(ax) -> None:
    ax.legend(title="Site", frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _staleness_plot(d: dict[str, Any]) -> dict[str, Any] | None:
    from matplotlib.ticker import MaxNLocator

    sites = d["config"]["sites"]
    pts = [(g["version"], x["site"], x["staleness"]) for g in d["globals"] for x in g["contributions"]]
    if not pts:
        return None
    fig, ax = _fig()
    n = len(sites)
    for i, s in enumerate(sites):
        mine = [(v, st) for v, site, st in pts if site == s]
        if mine:
            off = (i - (n - 1) / 2) * 0.6 / max(n, 1)
            ax.scatter([v + off for v, _ in mine], [st for _, st in mine], s=46, color=_color(sites, s), label=s,
                       zorder=3)
    top = max(st for _, _, st in pts)
    ax.set_ylim(-0.4, max(1, top) + 0.4)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Global version the update was folded into")
    ax.set_ylabel("Staleness (versions behind)")
    if top == 0:
        ax.set_title("every update was trained from the newest global", fontsize=9, color="#4b5563")
    _legend(ax)
    return _png(fig)


def round_durations(d: dict[str, Any]) -> list[tuple[int, float]]:
    """(version, seconds since the previous version) for v1..vN, from the aggregator's signatures."""
    gs = [g for g in d["globals"] if g["t"] is not None]
    return [(b["version"], max(0.0, b["t"] - a["t"])) for a, b in zip(gs, gs[1:])]


def _unit(seconds: list[float]) -> tuple[float, str]:
    top = max(seconds) if seconds else 0
    return (1.0, "seconds") if top < 120 else (60.0, "minutes") if top < 7200 else (3600.0, "hours")


def _durations_plot(d: dict[str, Any]) -> dict[str, Any] | None:
    durs = round_durations(d)
    if not durs:
        return None
    div, unit = _unit([s for _, s in durs])
    fig, ax = _fig()
    ax.bar([f"v{v}" for v, _ in durs], [s / div for _, s in durs], color="#4f46e5", width=0.6)
    ax.set_xlabel("Global version")
    ax.set_ylabel(f"Time since previous version ({unit})")
    return _png(fig)


def _cases_plot(d: dict[str, Any]) -> dict[str, Any] | None:
    sites = d["config"]["sites"]
    counts = [(s, d["sites"][s]["cases"]) for s in sites if d["sites"][s]["cases"]]
    if not counts:
        return None
    fig, ax = _fig(height=max(1.6, 0.45 * len(counts) + 0.9))
    ax.grid(True, axis="x", color="#e5e7eb", linewidth=0.8)
    ax.grid(False, axis="y")
    ax.barh([s for s, _ in counts][::-1], [n for _, n in counts][::-1],
            color=[_color(sites, s) for s, _ in counts][::-1], height=0.6)
    for i, (_, n) in enumerate(counts[::-1]):
        ax.text(n, i, f" {n}", va="center", fontsize=9)
    ax.set_xlabel("Training cases")
    return _png(fig)


def _sharing_plot(share: dict[str, Any]) -> dict[str, Any] | None:
    rows = [(s, v["shared_params"], v["params"] - v["shared_params"]) for s, v in sorted(share.items())
            if v.get("params")]
    if not rows:
        return None
    fig, ax = _fig(height=max(1.6, 0.45 * len(rows) + 1.1))
    ax.grid(True, axis="x", color="#e5e7eb", linewidth=0.8)
    ax.grid(False, axis="y")
    names = [r[0] for r in rows][::-1]
    shared = [r[1] for r in rows][::-1]
    own = [r[2] for r in rows][::-1]
    ax.barh(names, shared, color="#059669", label="averaged across sites", height=0.6)
    ax.barh(names, own, left=shared, color="#d1d5db", label="kept by the site", height=0.6)
    for i, (sh, ow) in enumerate(zip(shared, own)):
        ax.text(sh + ow, i, f" {100 * sh / max(sh + ow, 1):.0f}% shared", va="center", fontsize=9)
    ax.set_xlabel("Parameters")
    ax.legend(frameon=False, fontsize=9, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2)
    return _png(fig)


def latest_sharing(d: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
    for g in reversed(d["globals"]):
        share = (g["report"] or {}).get("sharing")
        if isinstance(share, dict) and share:
            return g["version"], share
    return None, {}


def make_plots(d: dict[str, Any]) -> dict[str, Any]:
    """id -> base64 PNG (None where the bucket holds no data for that plot)."""
    plots = {
        "plot-train-loss": _metric_plot(d, "train_loss", "Training loss"),
        "plot-pseudo-dice": _metric_plot(d, "pseudo_dice", "Pseudo-Dice (validation)", unit_interval=True),
        "plot-staleness": _staleness_plot(d),
        "plot-round-durations": _durations_plot(d),
        "plot-cases": _cases_plot(d),
    }
    if d["config"]["mode"] == "asym":
        plots["plot-sharing"] = _sharing_plot(latest_sharing(d)[1])
    return plots


# ---- HTML ------------------------------------------------------------------------------
_CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f6f7f9; --accent:#4f46e5; --ok:#047857; --bad:#b91c1c; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); font:15px/1.5 "Segoe UI", "Helvetica Neue", Arial, sans-serif; }
header { background:#1e1b4b; color:#fff; padding:28px 40px 24px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:600; }
header p { margin:0; color:#c7d2fe; font-size:13px; }
main { max-width:1180px; margin:0 auto; padding:24px 40px 48px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(140px, 1fr)); gap:12px; margin:0 0 8px; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:21px; font-weight:600; margin-top:2px; overflow-wrap:anywhere; }
.card .sub { color:var(--muted); font-size:12px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; margin-top:18px; }
section h2 { margin:0 0 4px; font-size:18px; }
section p.lead { margin:0 0 12px; color:var(--muted); font-size:13px; }
.grid2 { display:grid; grid-template-columns:repeat(auto-fit, minmax(440px, 1fr)); gap:16px; }
figure { margin:0; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; display:block; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
table { border-collapse:collapse; width:100%; font-size:13px; margin-top:6px; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#f9fafb; color:#374151; font-weight:600; white-space:nowrap; }
table.kv { width:auto; min-width:420px; }
table.kv td:first-child { color:#374151; font-weight:500; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
code { font-family:ui-monospace, Consolas, monospace; font-size:12px; color:#374151; }
.pill { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; font-weight:600; }
.ok { background:#d1fae5; color:var(--ok); } .warn { background:#fef3c7; color:#92400e; }
.bad { background:#fee2e2; color:var(--bad); } .info { background:#e0e7ff; color:#3730a3; }
.muted { color:var(--muted); } .reason { color:var(--bad); }
details summary { cursor:pointer; color:var(--accent); margin-top:8px; }
footer { color:var(--muted); font-size:12px; margin-top:24px; }
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "<span class='muted'>–</span>"
    if isinstance(x, float):
        return format(x, spec)
    return _e(x)


def _table(headers: list[str], rows: list[list[str]], num: set[int] = frozenset(), cls: str = "") -> str:
    head = "".join(f"<th class='num'>{_e(h)}</th>" if i in num else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td class='num'>{c}</td>" if i in num else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(plots: dict[str, Any], pid: str, caption: str) -> str:
    png = plots.get(pid)
    if png is None:
        return f"<p class='muted'>{_e(PLOT_IDS[pid])}: no data in the bucket yet.</p>"
    return (f"<figure><img id='{pid}' alt='{_e(PLOT_IDS[pid])}' style='width:{png['width']}px' "
            f"src='data:image/png;base64,{png['data']}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _dims(v: list[float] | None, spec: str = ".3g") -> str:
    return "<span class='muted'>–</span>" if not v else " × ".join(format(float(x), spec) for x in v)


def _phase_pill(phase: str | None) -> str:
    if not phase:
        return "<span class='pill warn'>no heartbeat</span>"
    cls = {"done": "ok", "published": "ok", "planned": "ok", "training": "info", "planning": "info",
           "finishing": "info", "waiting": "warn"}.get(phase, "info")
    return f"<span class='pill {cls}'>{_e(phase)}</span>"


def _plans_cells(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs for a plans summary: nnU-Net's fields, else the summary's plain values."""
    known = [("network_class_name", "Network"), ("patch_size", "Patch size"), ("n_stages", "Stages"),
             ("features_per_stage", "Features per stage"), ("batch_size", "Batch size"),
             ("spacing", "Target spacing"), ("num_input_channels", "Channels")]
    out = []
    for key, label in known:
        v = summary.get(key)
        if v is None:
            continue
        if key in ("patch_size", "spacing") and isinstance(v, list):
            out.append((label, _dims(v, ".4g")))
        elif isinstance(v, list):
            out.append((label, _e(", ".join(str(x) for x in v))))
        else:
            out.append((label, _e(str(v).rsplit(".", 1)[-1])))
    if not out:
        flat = {**{k: v for k, v in (summary.get("plans") or {}).items()}, **summary}
        out = [(k.replace("_", " ").capitalize(), _e(v)) for k, v in sorted(flat.items())
               if isinstance(v, (str, int, float, bool)) and k not in ("nnunet_version",)]
    return out


_MODE_LABELS = {"ffe": ("FFE", "FFE (one shared plan)"), "asym": ("AsymFedAvg", "AsymFedAvg (site-specific plans)"),
                "fedavg": ("FedAvg", "FedAvg (plain PyTorch model)")}


def render_html(d: dict[str, Any], plots: dict[str, Any]) -> str:
    """The report page (no external references: styles inline, images as data: URIs)."""
    c = d["config"]
    sites = c["sites"]
    gs = d["globals"]
    last = gs[-1] if gs else None
    mode = _MODE_LABELS.get(c["mode"], (c["mode"], c["mode"]))[1]
    if last is None:
        state, state_cls = "Setting up", "warn"
    elif last["final"]:
        state, state_cls = "Finished", "ok"
    else:
        state, state_cls = f"Round {last['version'] + 1} of {c['rounds']}", "info"
    span = (gs[-1]["t"] - gs[0]["t"]) if len(gs) > 1 and gs[0]["t"] and gs[-1]["t"] else None
    div, unit = _unit([span or 0])
    unit = {"seconds": "s", "minutes": "min", "hours": "h"}[unit]
    total_cases = (d["census"] or {}).get("total_cases") or sum(s["cases"] or 0 for s in d["sites"].values()) or None
    n_rejected = len({x["key"] for x in d["rejected"]} | {p["key"] for p in d["problems"]})

    cards = [
        ("Status", f"<span class='pill {state_cls}' style='font-size:16px'>{_e(state)}</span>",
         f"{len(gs) - 1 if gs else 0} of {c['rounds']} rounds aggregated"),
        ("Global model", _e(f"v{last['version']}") if last else "–",
         _e(last["signed_at"][:19].replace("T", " ") + " UTC") if last else "no global yet"),
        ("Sites", str(len(sites)), _e(", ".join(sites))),
        ("Training cases", _fmt(total_cases), "over all sites"),
        ("Mode", _e(_MODE_LABELS.get(c["mode"], (c["mode"], ""))[0]),
         _e(f"{c['aggregation']} aggregation, {c['configuration']}")),
        ("Training time", _e(f"{span / div:.3g} {unit}") if span is not None else "–", "v0 to the newest global"),
        ("Rejected files", str(n_rejected), "see the last section" if n_rejected else "none"),
    ]
    cards_html = "".join(f"<div class='card'><div class='label'>{_e(lbl)}</div><div class='value'>{val}</div>"
                         f"<div class='sub'>{sub}</div></div>" for lbl, val, sub in cards)

    # sites
    rows = []
    for s in sites:
        info = d["sites"][s]
        mine = sorted((u for u in d["updates"] if u["site"] == s), key=lambda u: u["round"])
        lastu = mine[-1] if mine else None
        rej = sum(1 for x in d["rejected"] if x["key"].startswith(layout.site_prefix(s)) or x["by"] == s)
        rows.append([f"<b style='color:{_color(sites, s)}'>■</b> {_e(s)}", _fmt(info["cases"]),
                     _phase_pill(info["phase"]) + (f" <span class='muted'>{_e(info['message'])}</span>"
                                                   if info["message"] else ""),
                     _e(info["heartbeat_at"][:19].replace("T", " ")) if info["heartbeat_at"] else "–",
                     str(len(mine)), _fmt(lastu["named"]["train_loss"] if lastu else None),
                     _fmt(lastu["named"]["pseudo_dice"] if lastu else None, ".3f"),
                     f"<span class='pill bad'>{rej}</span>" if rej else "0"])
    sites_html = _table(["Site", "Cases", "Phase", "Last heartbeat (UTC)", "Updates", "Last train loss",
                         "Last pseudo-Dice", "Rejected"], rows, num={1, 4, 5, 6})

    # rounds
    durs = dict(round_durations(d))
    ddiv, dunit = _unit(list(durs.values()))
    vrows = []
    for g in gs:
        contrib = ", ".join(f"{x['site']} (r{x['round']}, w={x['weight']:.3g}" + (f", stale {x['staleness']}" if x["staleness"] else "") + ")"
                            for x in g["contributions"])
        vrows.append([_e(f"v{g['version']}") + (" <span class='pill ok'>final</span>" if g["final"] else ""),
                      _e(g["signed_at"][:19].replace("T", " ")),
                      _fmt(durs[g["version"]] / ddiv, ".3g") if g["version"] in durs else "–",
                      _e(contrib) or "<span class='muted'>initial model</span>",
                      _e((g["report"] or {}).get("rule") or ""), _e((g["report"] or {}).get("reason") or "")])
    versions_html = _table(["Version", "Published (UTC)", f"Duration ({dunit})", "Contributions (update, weight)",
                            "Rule", "Why aggregated"], vrows, num={2})

    # updates
    urows = []
    for u in sorted(d["updates"], key=lambda u: (u["round"], u["site"])):
        n = u["named"]
        state = {"aggregated": f"<span class='pill ok'>in v{u['version']}</span>",
                 "rejected": "<span class='pill bad'>rejected</span>",
                 "pending": "<span class='pill warn'>pending</span>"}[u["state"]]
        if u["reason"]:
            state += f" <span class='reason'>{_e(short_reason(u['key'], u['reason']))}</span>"
        urows.append([_e(u["site"]), _e(f"{u['round'] + 1} (r{u['round']})"), _e(f"v{u['base_version']}"),
                      _fmt(u["staleness"]), _fmt(u["weight"]), _fmt(n["train_loss"]), _fmt(n["pseudo_dice"], ".3f"),
                      _fmt(n["epoch_time"], ".3g"), state])
    updates_html = _table(["Site", "Round", "Trained from", "Staleness", "Weight", "Train loss", "Pseudo-Dice",
                           "Epoch time (s)", "State"], urows, num={3, 4, 5, 6, 7})

    # fingerprint
    fp = d["fingerprint"]
    if fp is not None:
        props = ["mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5"]
        irows = [[_e(ch)] + [_fmt(p.get(k), ".4g") for k in props] for ch, p in fp["intensity"].items()]
        census_rows = ", ".join(f"{_e(s)}: {n}" for s, n in sorted((d["census"] or {}).get("sites", {}).items()))
        fp_html = (
            _table(["Fingerprint", ""], [
                ["Cases in the merged fingerprint", _fmt(fp["cases_in_fingerprint"])],
                ["Cases per site (census)", census_rows or "–"],
                ["Channels", _fmt((d["census"] or {}).get("num_channels"))],
                ["Median spacing", _dims((fp["spacing"] or {}).get("median"), ".4g")],
                ["Spacing range", (_dims((fp["spacing"] or {}).get("min"), ".4g") + " … "
                                   + _dims((fp["spacing"] or {}).get("max"), ".4g"))
                 if fp["spacing"] else "–"],
                ["Median shape after cropping", _dims((fp["shape"] or {}).get("median"), ".4g")],
                ["Median relative size after cropping", _fmt(fp["median_relative_size_after_cropping"], ".3g")],
            ], cls="kv") + "<h3 style='font-size:14px;margin:14px 0 0'>Foreground intensity per channel</h3>"
            + _table(["Channel", "Mean", "Median", "Std", "Min", "Max", "0.5th pct", "99.5th pct"], irows,
                     num=set(range(1, 8))))
    elif c["mode"] == "asym":
        fp_html = "<p class='muted'>AsymFedAvg: each site plans from its own fingerprint; no merged fingerprint is published.</p>"
    elif c["mode"] == "fedavg":
        fp_html = "<p class='muted'>FedAvg of a plain PyTorch model: no fingerprint phase.</p>"
    else:
        fp_html = "<p class='muted'>The merged fingerprint is not published yet.</p>"

    # plans: one column per group of sites holding the same plans, one row per field
    groups: dict[str, list[str]] = {}
    for s in sites:
        p = d["sites"][s]["plans"]
        if p:
            groups.setdefault(p["digest"], []).append(s)
    columns: list[dict[str, str]] = []
    for digest, members in groups.items():
        p = d["sites"][members[0]]["plans"]
        col = {"Plans": _e(p["identifier"]), "Configuration": _e(p["configuration"]),
               "Digest": f"<code>{_e(digest[:12])}</code>", **dict(_plans_cells(p["summary"]))}
        if p.get("nnunet_version"):
            col["nnU-Net version"] = _e(p["nnunet_version"])
        columns.append(col)
    labels = list(dict.fromkeys(k for col in columns for k in col))
    plans_note = ("All sites hold identical plans (same digest)." if len(groups) == 1 and len(sites) > 1 else
                  "One column per plans digest, with the sites that hold it.")
    plans_html = (f"<p class='lead'>{_e(plans_note)}</p>"
                  + _table(["Sites"] + [", ".join(m) for m in groups.values()],
                           [[_e(k)] + [col.get(k, "–") for col in columns] for k in labels], cls="kv")
                  if columns else "<p class='muted'>No plans published yet.</p>")

    # sharing
    sharing_html = ""
    if c["mode"] == "asym":
        v, share = latest_sharing(d)
        srows = [[_e(s), _fmt(x.get("shared_tensors")), _fmt(x.get("tensors")), _fmt(x.get("shared_params")),
                  _fmt(x.get("params")), _e(f"{100 * x['shared_params'] / max(x['params'], 1):.1f}%")]
                 for s, x in sorted(share.items()) if isinstance(x, dict) and "params" in x]
        layers = d.get("layers")
        layer_html = ""
        if layers:
            mark = {"shared": "<span class='pill ok'>shared</span>", "own": "<span class='pill warn'>own</span>",
                    "partly": "<span class='pill info'>partly</span>"}
            lrows = [[f"<code>{_e(m)}</code>"] + [mark.get(per.get(s, ""), "<span class='muted'>–</span>")
                                                  for s in layers["sites"]] for m, per in layers["modules"].items()]
            layer_html = (f"<details{' open' if len(lrows) <= 16 else ''}><summary>Layer by layer ({len(lrows)} modules, matched by "
                          f"{_e('resolution level' if layers['align'] == 'level' else 'name')})</summary>"
                          + _table(["Module"] + layers["sites"], lrows) + "</details>")
        sharing_html = (
            "<section id='sharing'><h2>Layers AsymFedAvg shares</h2>"
            f"<p class='lead'>From the aggregator's report in global v{_e(v)}: a tensor is averaged when another site's "
            "network has the same layer with the same shape; the rest stays with the site.</p>"
            + "<div style='max-width:640px'>" + _figure(plots, "plot-sharing", "Green: averaged across sites; grey: kept by the site alone.") + "</div>"
            + (_table(["Site", "Shared tensors", "Tensors", "Shared parameters", "Parameters", "Shared"], srows,
                      num={1, 2, 3, 4, 5}) if srows else "<p class='muted'>No aggregation yet.</p>")
            + layer_html + "</section>")

    # rejections and problems
    rj = [[f"<code>{_e(x['key'])}</code>", _e(x["by"]),
           f"<span class='reason'>{_e(short_reason(x['key'], x['reason']))}</span>",
           _e(x["at"][:19].replace("T", " "))] for x in d["rejected"]]
    listed = {x["key"] for x in d["rejected"]}
    pr = [[f"<code>{_e(p['key'])}</code>", "this report",
           f"<span class='reason'>{_e(short_reason(p['key'], p['error']))}</span>", "–"]
          for p in d["problems"] if p["key"] not in listed]
    problems_html = (_table(["File", "Rejected by", "Reason", "At (UTC)"], rj + pr) if rj or pr
                     else "<p><span class='pill ok'>none</span> Every file in the bucket verified.</p>")

    body = f"""
<header><h1>Federated training report</h1>
<p>Federation <code style='color:#e0e7ff'>{_e(d['federation_id'][:16])}</code> · {_e(d['url'])} · {_e(mode)} ·
generated {_e(d['generated_at'])}</p></header>
<main>
<div class='cards'>{cards_html}</div>
<section id='sites'><h2>Sites</h2><p class='lead'>Each hospital's state, from its signed heartbeat and update manifests.</p>
{sites_html}<div style='max-width:560px;margin-top:12px'>{_figure(plots, 'plot-cases', 'Training cases each site contributes (its census).')}</div></section>
<section id='training'><h2>Training curves</h2><p class='lead'>Reported by each site with every update: the last epoch of
each round. Pseudo-Dice is nnU-Net's validation estimate on the site's own held-out cases.</p>
<div class='grid2'>{_figure(plots, 'plot-train-loss', 'Training loss at the end of each round (lower is better).')}
{_figure(plots, 'plot-pseudo-dice', 'Validation pseudo-Dice at the end of each round (higher is better).')}</div></section>
<section id='rounds'><h2>Rounds</h2><p class='lead'>Each global version and how long it took, measured between the
aggregator's signatures.</p>
<div class='grid2'>{_figure(plots, 'plot-round-durations', 'Time between consecutive global versions.')}
{_figure(plots, 'plot-staleness', 'How many versions behind the current global each update was trained.')}</div>
{versions_html}</section>
<section id='updates'><h2>Updates</h2><p class='lead'>Every update manifest in the bucket: what it was trained from,
whether it was aggregated, with which weight and staleness, and its metrics.</p>{updates_html}</section>
<section id='fingerprint'><h2>Data fingerprint</h2><p class='lead'>The federation-wide nnU-Net fingerprint merged
from the sites' summaries (no image leaves a site).</p>{fp_html}</section>
<section id='plans'><h2>Plans</h2>{plans_html}</section>
{sharing_html}
<section id='problems'><h2>Rejected files</h2><p class='lead'>Files a party refused, with the reason, and files this
report could not verify.</p>{problems_html}</section>
<footer>Built by fedfs from the signed files in the bucket only; each verified against federation.json
(sha256 <code>{_e(d['federation_digest'])}</code>).</footer>
</main>"""
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>fedfs report · {_e(d['federation_id'][:12])}</title><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def build_report(fed: Federation, out_path: str | os.PathLike[str]) -> Path:
    """Write the HTML report of ``fed`` to ``out_path`` (atomically); return the path."""
    d = collect_history(fed)
    page = render_html(d, make_plots(d))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
