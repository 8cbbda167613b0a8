"""The report's views for large federations: counts, quantiles and the sites that stand out.

Past :data:`SCALE_SITES` sites, one row and one curve per site stop being readable. The
report then leads with aggregated views built here from a
:func:`~fedfs.ops.history.collect_history` dict: counts of sites by phase, the sites that
need attention (silent, blocked, with rejected files), the worst sites (highest last
training loss, lowest last pseudo-Dice) and the slowest ones (longest median time from a
global to the site's update trained from it, fewest updates), with per-site detail kept in
collapsed sections. :func:`site_stats` is pure data, so ``fedfs status --json`` users and
tests can read the same figures the page shows.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from ..protocol import layout
from ..protocol.timestamps import parse_stamp_or_none

__all__ = ["SCALE_SITES", "TOP_SITES", "at_scale", "names_line", "phase_counts", "round_summary", "site_stats",
           "standouts"]

#: Above this many sites the report shows aggregated views first and folds per-site detail away.
SCALE_SITES = 30
#: How many sites each "worst" / "slowest" list names.
TOP_SITES = 5


def at_scale(d: dict[str, Any]) -> bool:
    """Whether the federation has more sites than one table or one legend shows readably."""
    return len(d["config"]["sites"]) > SCALE_SITES


def names_line(names: list[str], limit: int = 8) -> str:
    """``A, B, C`` for a few names; ``A, B, … Z (N sites)`` for many."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit - 2])}, … {names[-1]} ({len(names)} sites)"


def phase_counts(d: dict[str, Any]) -> dict[str, int]:
    """Sites per heartbeat phase ("no heartbeat" for none), most common first; "silent" counted apart."""
    c = Counter((info["phase"] or "no heartbeat") for info in d["sites"].values())
    return dict(c.most_common())


def site_stats(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per site: updates sent and folded, rejections, last loss and pseudo-Dice, median turnaround
    (seconds from a global's signature to the site's update trained from it), mean staleness."""
    global_t = {g["version"]: g["t"] for g in d["globals"]}
    out: dict[str, dict[str, Any]] = {}
    for s in d["config"]["sites"]:
        out[s] = {"updates": 0, "aggregated": 0, "rejected": 0, "turnaround": [], "staleness": [],
                  "last_loss": None, "last_dice": None, "last_round": -1}
    for u in d["updates"]:
        st = out.get(u["site"])
        if st is None:
            continue
        st["updates"] += 1
        st["aggregated"] += u["state"] == "aggregated"
        if u["staleness"] is not None:
            st["staleness"].append(u["staleness"])
        t_u, t_g = parse_stamp_or_none(u["signed_at"]), global_t.get(u["base_version"])
        if t_u is not None and t_g is not None:
            st["turnaround"].append(max(0.0, t_u - t_g))
        if u["round"] > st["last_round"]:
            st["last_round"] = u["round"]
            st["last_loss"], st["last_dice"] = u["named"].get("train_loss"), u["named"].get("pseudo_dice")
    for s, st in out.items():  # as the per-site table counts them: files under the site's folder, or refused by it
        prefix = layout.site_prefix(s)
        st["rejected"] = sum(1 for x in d["rejected"] if x["key"].startswith(prefix) or x.get("by") == s)
    for s, st in out.items():
        info = d["sites"][s]
        st["turnaround_s"] = statistics.median(st["turnaround"]) if st["turnaround"] else None
        st["mean_staleness"] = statistics.fmean(st["staleness"]) if st["staleness"] else None
        st["phase"], st["silent"] = info["phase"], bool(info.get("silent"))
        del st["turnaround"], st["staleness"], st["last_round"]
    return out


def standouts(d: dict[str, Any], stats: dict[str, dict[str, Any]] | None = None,
              top: int = TOP_SITES) -> dict[str, list[tuple[str, str]]]:
    """The sites to look at first, as (site, why) lists: attention (silent, blocked, rejected files),
    worst (highest last training loss, lowest last pseudo-Dice), slowest (longest turnaround, fewest updates)."""
    stats = stats if stats is not None else site_stats(d)
    attention = []
    for s, st in stats.items():
        why = []
        if st["silent"]:
            why.append("silent")
        if st["phase"] == "blocked":
            why.append("blocked: " + (d["sites"][s].get("message") or "")[:80])
        if st["phase"] is None:
            why.append("no heartbeat")
        if st["rejected"]:
            why.append(f"{st['rejected']} rejected file(s)")
        if why:
            attention.append((s, "; ".join(why)))
    losses = sorted(((st["last_loss"], s) for s, st in stats.items() if st["last_loss"] is not None), reverse=True)
    dices = sorted((st["last_dice"], s) for s, st in stats.items() if st["last_dice"] is not None)
    worst = [(s, f"last train loss {v:.4g}") for v, s in losses[:top]]
    worst += [(s, f"last pseudo-Dice {v:.3f}") for v, s in dices[:top]]
    slow = sorted(((st["turnaround_s"], s) for s, st in stats.items() if st["turnaround_s"] is not None),
                  reverse=True)
    most = max((st["updates"] for st in stats.values()), default=0)
    behind = sorted(((st["updates"], s) for s, st in stats.items() if st["updates"] < most))
    slowest = [(s, f"median {_dur(v)} from a global to its update") for v, s in slow[:top]]
    slowest += [(s, f"{n} update(s), others up to {most}") for n, s in behind[:top] if s not in {x for x, _ in slowest}]
    return {"attention": attention[: 4 * top], "worst": worst, "slowest": slowest}


def round_summary(d: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round (1-based): updates, how many were aggregated / pending / rejected, and quantiles of
    the training loss and staleness across sites."""
    by: dict[int, list[dict[str, Any]]] = {}
    for u in d["updates"]:
        by.setdefault(u["round"], []).append(u)
    rows = []
    for r in sorted(by):
        us = by[r]
        losses = [u["named"]["train_loss"] for u in us if u["named"].get("train_loss") is not None]
        stale = [u["staleness"] for u in us if u["staleness"] is not None]
        states = Counter(u["state"] for u in us)
        rows.append({"round": r + 1, "updates": len(us), "aggregated": states.get("aggregated", 0),
                     "pending": states.get("pending", 0), "rejected": states.get("rejected", 0),
                     "loss_median": statistics.median(losses) if losses else None,
                     "loss_q10": _quantile(losses, 0.1), "loss_q90": _quantile(losses, 0.9),
                     "staleness_max": max(stale) if stale else None,
                     "stale_updates": sum(1 for x in stale if x)})
    return rows


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
