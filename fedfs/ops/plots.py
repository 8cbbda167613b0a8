"""The report's figures: matplotlib (Agg) plots of a :func:`~fedfs.ops.history.collect_history` dict, as PNGs.

Each plot is a base64 PNG drawn at twice its display size (sharp on high-DPI
screens) so the report can embed it as a ``data:`` URI; a plot the bucket has no
data for is None, and the page shows a note instead.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from .report_scale import TOP_SITES, at_scale, site_stats

__all__ = ["PLOT_IDS", "make_plots", "round_durations", "latest_sharing", "site_color", "time_unit"]

#: id -> what the plot shows; a plot is left out (with a note) when the bucket has no data for it.
PLOT_IDS = {
    "plot-train-loss": "Training loss per site and round",
    "plot-pseudo-dice": "Validation pseudo-Dice per site and round",
    "plot-staleness": "Staleness of each update when it was aggregated",
    "plot-round-durations": "Time taken by each round (between global versions)",
    "plot-cases": "Training cases per site",
    "plot-sharing": "Parameters AsymFedAvg shares per site",
}
_CSS_DPI = 96
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
_GRID = {"color": "#e5e7eb", "linewidth": 0.8}


def make_plots(d: dict[str, Any]) -> dict[str, Any]:
    """id -> ``{"data": base64 PNG, "width": CSS pixels}`` (None where the bucket holds no data for that plot)."""
    if at_scale(d):  # one curve, dot or bar per site stops being readable: quantiles, counts, the worst sites
        plots = {
            "plot-train-loss": _band_plot(d, "train_loss", "Training loss", worst_high=True),
            "plot-pseudo-dice": _band_plot(d, "pseudo_dice", "Pseudo-Dice (validation)", worst_high=False),
            "plot-staleness": _staleness_counts_plot(d),
            "plot-round-durations": _durations_plot(d),
            "plot-cases": _cases_histogram(d),
        }
    else:
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


def site_color(sites: list[str], site: str) -> str:
    """The colour a site has in every plot and table of the report."""
    return _COLORS[sites.index(site) % len(_COLORS)] if site in sites else "#333333"


def time_unit(seconds: list[float]) -> tuple[float, str]:
    """(divisor, unit name) that shows the largest of ``seconds`` readably."""
    top = max(seconds) if seconds else 0
    return (1.0, "seconds") if top < 120 else (60.0, "minutes") if top < 7200 else (3600.0, "hours")


def round_durations(d: dict[str, Any]) -> list[tuple[int, float]]:
    """(version, seconds since the previous version) for v1..vN, from the aggregator's signatures."""
    gs = [g for g in d["globals"] if g["t"] is not None]
    return [(b["version"], max(0.0, b["t"] - a["t"])) for a, b in zip(gs, gs[1:])]


def latest_sharing(d: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
    """(version, per-site sharing) from the newest global whose report says what AsymFedAvg shared."""
    for g in reversed(d["globals"]):
        share = (g["report"] or {}).get("sharing")
        if isinstance(share, dict) and share:
            return g["version"], share
    return None, {}


# ---- figures -------------------------------------------------------------------------
def _fig(width: float = 6.4, height: float = 3.4, *, bars: bool = False):
    """A figure with the report's look; ``bars``: horizontal bars, so the grid runs across x."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=_CSS_DPI)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, axis="y", **_GRID)
    ax.set_axisbelow(True)
    if bars:
        ax.grid(True, axis="x", **_GRID)
        ax.grid(False, axis="y")
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


def _legend(ax) -> None:
    ax.legend(title="Site", frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _integer_axes(ax, *axes: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for name in axes:
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))


def _metric_plot(d: dict[str, Any], metric: str, ylabel: str, unit_interval: bool = False) -> dict[str, Any] | None:
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
                label=s, color=site_color(sites, s))
    ax.set_xlabel("Round")
    ax.set_ylabel(ylabel)
    _integer_axes(ax, "x")
    if unit_interval:
        lo = min(p[1] for pts in series.values() for p in pts)
        ax.set_ylim(max(0.0, min(lo - 0.05, 0.5)), 1.0)
    _legend(ax)
    return _png(fig)


def _staleness_plot(d: dict[str, Any]) -> dict[str, Any] | None:
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
            ax.scatter([v + off for v, _ in mine], [st for _, st in mine], s=46, color=site_color(sites, s),
                       label=s, zorder=3)
    top = max(st for _, _, st in pts)
    ax.set_ylim(-0.4, max(1, top) + 0.4)
    _integer_axes(ax, "y", "x")
    ax.set_xlabel("Global version the update was folded into")
    ax.set_ylabel("Staleness (versions behind)")
    if top == 0:
        ax.set_title("every update was trained from the newest global", fontsize=9, color="#4b5563")
    _legend(ax)
    return _png(fig)


def _durations_plot(d: dict[str, Any]) -> dict[str, Any] | None:
    durs = round_durations(d)
    if not durs:
        return None
    div, unit = time_unit([s for _, s in durs])
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
    fig, ax = _fig(height=max(1.6, 0.45 * len(counts) + 0.9), bars=True)
    ax.barh([s for s, _ in counts][::-1], [n for _, n in counts][::-1],
            color=[site_color(sites, s) for s, _ in counts][::-1], height=0.6)
    for i, (_, n) in enumerate(counts[::-1]):
        ax.text(n, i, f" {n}", va="center", fontsize=9)
    ax.set_xlabel("Training cases")
    return _png(fig)


def _sharing_plot(share: dict[str, Any]) -> dict[str, Any] | None:
    rows = [(s, v["shared_params"], v["params"] - v["shared_params"]) for s, v in sorted(share.items())
            if v.get("params")]
    if not rows:
        return None
    fig, ax = _fig(height=max(1.6, 0.45 * len(rows) + 1.1), bars=True)
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


# ---- many sites ------------------------------------------------------------------------
def _per_round(d: dict[str, Any], metric: str) -> dict[int, dict[str, float]]:
    """round (1-based) -> {site: value} for one metric."""
    out: dict[int, dict[str, float]] = {}
    for u in d["updates"]:
        v = u["named"].get(metric)
        if v is not None:
            out.setdefault(u["round"] + 1, {})[u["site"]] = float(v)
    return out


def _band_plot(d: dict[str, Any], metric: str, ylabel: str, *, worst_high: bool) -> dict[str, Any] | None:
    """Median across sites per round, with the 25-75 % and 5-95 % bands, and the worst sites' own curves."""
    import numpy as np

    by_round = _per_round(d, metric)
    if not by_round:
        return None
    rounds = sorted(by_round)
    q = np.array([np.percentile(list(by_round[r].values()), [5, 25, 50, 75, 95]) for r in rounds])
    fig, ax = _fig(7.2, 3.6)
    ax.fill_between(rounds, q[:, 0], q[:, 4], color="#c7d2fe", alpha=0.6, label="5–95 % of sites", linewidth=0)
    ax.fill_between(rounds, q[:, 1], q[:, 3], color="#818cf8", alpha=0.6, label="25–75 %", linewidth=0)
    ax.plot(rounds, q[:, 2], color="#312e81", linewidth=2.2, marker="o", markersize=4, label="median")
    stats = site_stats(d)
    key = "last_loss" if metric == "train_loss" else "last_dice"
    ranked = sorted(((st[key], s) for s, st in stats.items() if st[key] is not None), reverse=worst_high)
    for i, (_, s) in enumerate(ranked[:TOP_SITES]):
        pts = sorted((r, vals[s]) for r, vals in by_round.items() if s in vals)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_COLORS[3 + i % 7], linewidth=1.2,
                linestyle="--", marker=".", label=f"{s} (worst {i + 1})")
    ax.set_xlabel("Round")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{len(stats)} sites: quantiles across sites, and the {min(TOP_SITES, len(ranked))} worst",
                 fontsize=9, color="#4b5563")
    _integer_axes(ax, "x")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _staleness_counts_plot(d: dict[str, Any]) -> dict[str, Any] | None:
    """Per global version, how many folded updates had each staleness (stacked bars)."""
    pts = [(g["version"], x["staleness"]) for g in d["globals"] for x in g["contributions"]]
    if not pts:
        return None
    versions = sorted({v for v, _ in pts})
    levels = sorted({min(st, 3) for _, st in pts})
    fig, ax = _fig()
    bottom = [0] * len(versions)
    shades = {0: "#4f46e5", 1: "#f59e0b", 2: "#f97316", 3: "#b91c1c"}
    for lv in levels:
        counts = [sum(1 for v, st in pts if v == ver and min(st, 3) == lv) for ver in versions]
        ax.bar([f"v{v}" for v in versions], counts, bottom=bottom, color=shades[lv], width=0.6,
               label="fresh" if lv == 0 else (f"{lv} behind" if lv < 3 else "3+ behind"))
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("Global version the updates were folded into")
    ax.set_ylabel("Updates folded")
    ax.legend(frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _cases_histogram(d: dict[str, Any]) -> dict[str, Any] | None:
    """How many sites hold how many training cases."""
    counts = [d["sites"][s]["cases"] for s in d["config"]["sites"] if d["sites"][s]["cases"]]
    if not counts:
        return None
    fig, ax = _fig(height=2.8)
    ax.hist(counts, bins=min(30, max(5, len(set(counts)))), color="#4f46e5")
    ax.set_xlabel("Training cases per site")
    ax.set_ylabel("Sites")
    ax.set_title(f"{len(counts)} sites, {sum(counts)} cases in all", fontsize=9, color="#4b5563")
    return _png(fig)
