"""``fedfs status`` for large federations: counts and the sites that stand out, not 1,000 rows.

Past :data:`STATUS_ROWS` sites a table of every site is neither readable nor quick to lay out
(rich measures every cell: about 2.5 s for 1,000 rows). The text form then leads with counts
by phase and lists only the sites that need a look: silent ones, those with rejected files,
the stalest, the worst by pseudo-Dice and by training loss, and the slowest per epoch, each
with the reason it is shown. ``fedfs status --all`` still prints every row, and ``--json``
holds everything. Pure data over a :func:`~fedfs.ops.status.collect_status` dict.
"""

from __future__ import annotations

import statistics
from typing import Any

from .report_scale import phase_counts

__all__ = ["STATUS_ROWS", "TOP_SITES", "at_scale", "phase_line", "notable_sites", "contribution_lines"]

#: Above this many sites the text form of ``fedfs status`` shows only the sites that stand out.
STATUS_ROWS = 40
#: How many sites each "worst" / "stalest" / "slowest" list names.
TOP_SITES = 5


def at_scale(d: dict[str, Any]) -> bool:
    return len(d["sites"]) > STATUS_ROWS


def phase_line(d: dict[str, Any]) -> str:
    """``1000 sites: 950 training, 40 waiting, 10 done; 3 silent; 5 with rejected files``."""
    sites = d["sites"]
    line = f"{len(sites)} sites: " + ", ".join(f"{n} {phase}" for phase, n in phase_counts(d).items())
    silent = sum(1 for s in sites.values() if s.get("silent"))
    rejected = sum(1 for s in sites.values() if s["rejected"])
    extra = ([f"{silent} silent"] if silent else []) + ([f"{rejected} with rejected files"] if rejected else [])
    return line + ("; " + "; ".join(extra) if extra else "")


def _top(sites: dict[str, Any], value: Any, *, highest: bool) -> list[str]:
    """The :data:`TOP_SITES` highest (or lowest) by ``value``, among those beyond the median only:
    when every site has the same staleness, none of them stands out."""
    scored = [(v, name) for name, s in sites.items() if (v := value(s)) is not None]
    if not scored:
        return []
    mid = statistics.median(v for v, _n in scored)
    scored = [(v, n) for v, n in scored if (v > mid if highest else v < mid)]
    scored.sort(key=lambda vn: (-vn[0] if highest else vn[0], vn[1]))
    return [name for _v, name in scored[:TOP_SITES]]


def notable_sites(d: dict[str, Any]) -> dict[str, list[str]]:
    """Site name -> why it is shown (``silent``, ``rejected files``, ``stalest``, ``lowest pseudo-Dice``,
    ``highest train loss``, ``slowest epoch``), in the status's site order. Every silent site and
    every site with rejected files is named; the other lists hold at most :data:`TOP_SITES` each,
    beyond the median."""
    sites = d["sites"]
    why: dict[str, list[str]] = {}

    def mark(names: list[str], reason: str) -> None:
        for n in names:
            why.setdefault(n, []).append(reason)

    mark([n for n, s in sites.items() if s.get("silent")], "silent")
    mark([n for n, s in sites.items() if s["rejected"]], "rejected files")
    mark(_top(sites, lambda s: s["staleness"], highest=True), "stalest")
    mark(_top(sites, lambda s: s["metrics"]["pseudo_dice"], highest=False), "lowest pseudo-Dice")
    mark(_top(sites, lambda s: s["metrics"]["train_loss"], highest=True), "highest train loss")
    mark(_top(sites, lambda s: s["metrics"]["epoch_time"], highest=True), "slowest epoch")
    return {n: why[n] for n in sites if n in why}


def _spread(xs: list[float], fmt: str) -> str:
    return f"{fmt.format(min(xs))} / {fmt.format(statistics.median(xs))} / {fmt.format(max(xs))}"


def contribution_lines(g: dict[str, Any]) -> list[str]:
    """The current global's contributions in a few lines: how many, staleness and weight spread
    (min / median / max), and the largest weights."""
    cs = g["contributions"]
    if not cs:
        return []
    weights = [float(x["weight"]) for x in cs]
    biggest = sorted(cs, key=lambda x: (-float(x["weight"]), x["site"]))[:TOP_SITES]
    return [f"{len(cs)} updates; staleness min / median / max {_spread([x['staleness'] for x in cs], '{:g}')}; "
            f"weight {_spread(weights, '{:.4g}')}",
            "largest weights: " + ", ".join(f"{x['site']} {float(x['weight']):.4g}" for x in biggest)]
