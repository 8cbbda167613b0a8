"""``fedfs report``: one self-contained HTML page about a federation, from bucket files only.

:func:`~fedfs.ops.history.collect_history` reads the whole history (every global
and update manifest, the fingerprint and plans documents, status documents),
verifying each file like any reader; files that do not verify are listed as
problems. :func:`~fedfs.ops.plots.make_plots` draws the plots with matplotlib
(Agg) as embedded PNGs, and :func:`build_report` writes one HTML file with no
external references, so it can be mailed or opened on a machine without network access.

What it shows: per-site training loss and validation pseudo-Dice per round,
the staleness of each update, how long each round took (time between global
versions, from the aggregator's signatures), the merged fingerprint (intensity
properties, median spacing, case counts), the plans summary, and which layers
AsymFedAvg averages across sites.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..protocol import layout
from .history import collect_history
from .plots import PLOT_IDS, latest_sharing, make_plots, round_durations, site_color, time_unit
from .report_scale import at_scale, names_line, phase_counts, round_summary, site_stats, standouts
from .status import SILENT_AFTER_S, dice_by_target, format_targets, human_age, rule_label, short_reason

if TYPE_CHECKING:
    from ..federation import Federation

__all__ = ["collect_history", "build_report", "render_html", "make_plots", "PLOT_IDS"]


def build_report(fed: Federation, out_path: str | os.PathLike[str]) -> Path:
    """Write the HTML report of ``fed`` to ``out_path`` (atomically); return the path."""
    d = collect_history(fed)
    d["privacy"] = _privacy_state(fed, d)
    page = render_html(d, make_plots(d))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


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


def _when(stamp: str) -> str:
    """A protocol stamp to the second, for a table cell (the column says UTC)."""
    return _e(stamp[:19].replace("T", " "))


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
    mode = _MODE_LABELS.get(d["config"]["mode"], (d["config"]["mode"], d["config"]["mode"]))[1]
    body = f"""
<header><h1>Federated training report</h1>
<p>Federation <code style='color:#e0e7ff'>{_e(d['federation_id'][:16])}</code> · {_e(d['url'])} · {_e(mode)} ·
generated {_e(d['generated_at'])}</p></header>
<main>
<div class='cards'>{_cards(d)}</div>
<section id='sites'><h2>Sites</h2><p class='lead'>Each hospital's state, from its signed heartbeat and update manifests.</p>
{_sites(d)}<div style='max-width:560px;margin-top:12px'>{_figure(plots, 'plot-cases', 'Training cases each site contributes (its census).')}</div></section>
<section id='training'><h2>Training curves</h2><p class='lead'>Reported by each site with every update: the last epoch of
each round. Pseudo-Dice is nnU-Net's per-epoch estimate on the validation split of the site's fold (its own cases, not
trained on); the final validation Dice, on that split's full images, is in the Sites table.</p>
<div class='grid2'>{_figure(plots, 'plot-train-loss', 'Training loss at the end of each round (lower is better).')}
{_figure(plots, 'plot-pseudo-dice', 'Validation pseudo-Dice at the end of each round (higher is better).')}</div></section>
<section id='rounds'><h2>Rounds</h2><p class='lead'>Each global version and how long it took, measured between the
aggregator's signatures.</p>
<div class='grid2'>{_figure(plots, 'plot-round-durations', 'Time between consecutive global versions.')}
{_figure(plots, 'plot-staleness', 'How many versions behind the current global each update was trained.')}</div>
{_versions(d)}</section>
{_privacy(d)}
<section id='updates'><h2>Updates</h2><p class='lead'>Every update manifest in the bucket: what it was trained from,
whether it was aggregated, with which weight and staleness, and its metrics.</p>{_updates(d)}</section>
<section id='fingerprint'><h2>Data fingerprint</h2>{_fingerprint(d)}</section>
<section id='plans'><h2>Plans</h2>{_plans(d)}</section>
{_sharing(d, plots)}
<section id='problems'><h2>Rejected files</h2><p class='lead'>Files a party refused, with the reason, and files this
report could not verify.</p>{_problems(d)}</section>
<footer>Built by fedfs from the signed files in the bucket only; each verified against federation.json
(sha256 <code>{_e(d['federation_digest'])}</code>).</footer>
</main>"""
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>fedfs report · {_e(d['federation_id'][:12])}</title><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>\n")


# ---- sections ----------------------------------------------------------------------------
def _privacy_state(fed: Federation, d: dict[str, Any]) -> dict[str, Any]:
    """The robust rule and the DP budget spent, from the newest global's record (fedfs.privacy.dp)."""
    from ..privacy.dp import privacy_status

    return privacy_status(fed.config, (d["globals"][-1]["report"] or {}) if d["globals"] else None)


def _privacy(d: dict[str, Any]) -> str:
    """A section on the robust rule and differential privacy: settings, then epsilon after each global."""
    from ..privacy.dp import privacy_lines

    p = d.get("privacy")
    lines = privacy_lines(p) if p else []
    if not lines:
        return ""
    body = "".join(f"<p class='lead'>{_e(line)}</p>" for line in lines)
    rows = [[_e(f"v{g['version']}"), _fmt(rec.get("contributions")), _fmt(rec.get("noise_multiplier"), ".4g"),
             _fmt(rec.get("epsilon_round"), ".4g"), _fmt(rec.get("epsilon"), ".4g"),
             _fmt(rec.get("epsilon_single_update"), ".4g")]
            for g in d["globals"] for rec in [((g["report"] or {}).get("dp") or {})] if rec and g["contributions"]]
    if rows:
        body += _table(["Version", "Updates", "Noise multiplier", "Epsilon (round)", "Epsilon (cumulative)",
                        "Epsilon (one site's updates)"], rows, num={1, 2, 3, 4, 5})
    return f"<section id='privacy'><h2>Privacy and robustness</h2>{body}</section>"


def _cards(d: dict[str, Any]) -> str:
    """The summary cards at the top: state, newest global, sites, cases, mode, time, rejections."""
    c = d["config"]
    sites = c["sites"]
    gs = d["globals"]
    last = gs[-1] if gs else None
    if last is None:
        state, state_cls = "Setting up", "warn"
    elif last["final"]:
        state, state_cls = "Finished", "ok"
    else:
        state, state_cls = f"Round {last['version'] + 1} of {c['rounds']}", "info"
    span = (gs[-1]["t"] - gs[0]["t"]) if len(gs) > 1 and gs[0]["t"] and gs[-1]["t"] else None
    div, unit = time_unit([span or 0])
    unit = {"seconds": "s", "minutes": "min", "hours": "h"}[unit]
    total_cases = (d["census"] or {}).get("total_cases") or sum(s["cases"] or 0 for s in d["sites"].values()) or None
    n_rejected = len({x["key"] for x in d["rejected"]} | {p["key"] for p in d["problems"]})
    cards = [
        ("Status", f"<span class='pill {state_cls}' style='font-size:16px'>{_e(state)}</span>",
         f"{len(gs) - 1 if gs else 0} of {c['rounds']} rounds aggregated"),
        ("Global model", _e(f"v{last['version']}") if last else "–",
         _when(last["signed_at"]) + " UTC" if last else "no global yet"),
        ("Sites", str(len(sites)), _e(", ".join(f"{n} {p}" for p, n in phase_counts(d).items()) if at_scale(d)
                                     else ", ".join(sites))),
        ("Training cases", _fmt(total_cases), "over all sites"),
        ("Mode", _e(_MODE_LABELS.get(c["mode"], (c["mode"], ""))[0]),
         _e(f"{c['aggregation']} aggregation, {c['configuration']}")),
        ("Training time", _e(f"{span / div:.3g} {unit}") if span is not None else "–", "v0 to the newest global"),
        ("Rejected files", str(n_rejected), "see the last section" if n_rejected else "none"),
    ]
    return "".join(f"<div class='card'><div class='label'>{_e(lbl)}</div><div class='value'>{val}</div>"
                   f"<div class='sub'>{sub}</div></div>" for lbl, val, sub in cards)


def _sites(d: dict[str, Any]) -> str:
    """Past SCALE_SITES sites: counts by phase and the sites that stand out, then the per-site table folded away."""
    if not at_scale(d):
        return _site_table(d)
    stats = site_stats(d)
    counts = phase_counts(d)
    silent = sum(1 for st in stats.values() if st["silent"])
    rows = [[_phase_pill(None if p == "no heartbeat" else p), str(n)] for p, n in counts.items()]
    if silent:
        rows.append(["<span class='pill bad'>silent</span>", str(silent)])
    out = ("<div class='grid2'><div><h3 style='font-size:14px;margin:4px 0'>Sites by phase</h3>"
           + _table(["Phase", "Sites"], rows, num={1}, cls="kv") + "</div><div>" + _standouts(d, stats)
           + "</div></div>")
    return out + f"<details id='all-sites'><summary>Every site ({len(stats)} rows)</summary>{_site_table(d)}</details>"


def _standouts(d: dict[str, Any], stats: dict[str, Any]) -> str:
    """The sites to look at first: needing attention, worst metrics, slowest."""
    groups = standouts(d, stats)
    parts = []
    for key, title in (("attention", "Needs attention"), ("worst", "Worst metrics"), ("slowest", "Slowest")):
        items = groups[key]
        if not items:
            body = "<p class='muted'>none</p>" if key == "attention" else "<p class='muted'>no data yet</p>"
        else:
            body = _table(["Site", "Why"], [[f"<b>{_e(site)}</b>", _e(why)] for site, why in items])
        cls = " class='standout-bad'" if key == "attention" and items else ""
        parts.append(f"<h3{cls} id='standout-{key}' style='font-size:14px;margin:4px 0'>{title}</h3>{body}")
    return "".join(parts)


def _site_table(d: dict[str, Any]) -> str:
    """One row per site: cases, phase, heartbeat, updates, last metrics, rejections."""
    sites = d["config"]["sites"]
    rows = []
    for s in sites:
        info = d["sites"][s]
        mine = sorted((u for u in d["updates"] if u["site"] == s), key=lambda u: u["round"])
        lastu = mine[-1] if mine else None
        rej = sum(1 for x in d["rejected"] if x["key"].startswith(layout.site_prefix(s)) or x["by"] == s)
        rows.append([f"<b style='color:{site_color(sites, s)}'>■</b> {_e(s)}", _fmt(info["cases"]),
                     _phase_pill(info["phase"]) + (f" <span class='muted'>{_e(info['message'])}</span>"
                                                   if info["message"] else ""),
                     _heartbeat(info),
                     str(len(mine)), _fmt(lastu["named"]["train_loss"] if lastu else None),
                     _fmt(lastu["named"]["pseudo_dice"] if lastu else None, ".3f") + _targets(lastu),
                     _fmt(info.get("metrics", {}).get("validation_dice"), ".3f"),
                     f"<span class='pill bad'>{rej}</span>" if rej else "0"])
    return _table(["Site", "Cases", "Phase", "Last heartbeat (UTC)", "Updates", "Last train loss",
                   "Last pseudo-Dice", "Final validation Dice", "Rejected"], rows, num={1, 4, 5, 6, 7}) \
        + _aggregator_line(d)


def _targets(update: dict[str, Any] | None) -> str:
    """An update's pseudo-Dice per region or label, by name, under the mean (regions, several labels)."""
    line = format_targets(dice_by_target(update["metrics"])) if update else ""
    return f"<br><span class='muted'>{_e(line)}</span>" if line else ""


def _heartbeat(info: dict[str, Any]) -> str:
    """The heartbeat's stamp, its age when the report was made, and a "silent" pill past SILENT_AFTER_S."""
    if not info.get("heartbeat_at"):
        return "–"
    age = f" <span class='muted'>({_e(human_age(info.get('heartbeat_age_s')))})</span>"
    pill = (f" <span class='pill bad' title='no heartbeat for over {SILENT_AFTER_S / 60:.0f} min: killed, hung or "
            "switched off?'>silent</span>" if info.get("silent") else "")
    return _when(info["heartbeat_at"]) + age + pill


def _aggregator_line(d: dict[str, Any]) -> str:
    """The aggregator's last heartbeat, and a warning when it looks dead while updates wait."""
    a = d.get("aggregator")
    if not a:
        return ""
    beat = (f"{_e(a['phase'])}, last heartbeat {_when(a['heartbeat_at'])} UTC "
            f"({_e(human_age(a.get('heartbeat_age_s')))})" if a.get("heartbeat_at") else "no heartbeat")
    line = f"<p class='muted'>Aggregator <b>{_e(a['name'])}</b>: {beat}.</p>"
    if a.get("dead"):
        line += (f"<p><span class='pill bad'>aggregator silent</span> <span class='reason'>no sign of it for "
                 f"{_e(human_age(a['activity_age_s']).removesuffix(' ago'))} while "
                 f"{_e(', '.join(a['waiting_on_it'][:6]))} wait(s): is <code>fedfs aggregator run</code> still "
                 "running?</span></p>")
    return line


def _versions(d: dict[str, Any]) -> str:
    """One row per global version: when, how long, which updates, which rule."""
    durs = dict(round_durations(d))
    ddiv, dunit = time_unit(list(durs.values()))
    rows = []
    scale = at_scale(d)
    for g in d["globals"]:
        if scale and g["contributions"]:
            rows.append(_version_row_at_scale(d, g, durs, ddiv))
            continue
        contrib = ", ".join(f"{x['site']} (round {x['round'] + 1}, w={x['weight']:.3g}"
                            + (f", stale {x['staleness']}" if x["staleness"] else "") + ")"
                            for x in g["contributions"])
        rows.append([_e(f"v{g['version']}") + (" <span class='pill ok'>final</span>" if g["final"] else ""),
                     _when(g["signed_at"]),
                     _fmt(durs[g["version"]] / ddiv, ".3g") if g["version"] in durs else "–",
                     _e(contrib) or "<span class='muted'>initial model</span>",
                     _e(rule_label((g["report"] or {}).get("rule"), d["config"]["aggregation"]) if g["contributions"]
                        else ""), _e((g["report"] or {}).get("reason") or "")])
    return _table(["Version", "Published (UTC)", f"Duration ({dunit})", "Contributions (update, weight)",
                   "Rule", "Why aggregated"], rows, num={2})


def _version_row_at_scale(d: dict[str, Any], g: dict[str, Any], durs: dict[int, float], ddiv: float) -> list[str]:
    """A version's row past SCALE_SITES sites: how many updates, how stale, the weights' range; the list folded."""
    cs = g["contributions"]
    stale = [x["staleness"] for x in cs]
    weights = [x["weight"] for x in cs]
    summary = (f"{len(cs)} updates from {len({x['site'] for x in cs})} sites; "
               f"{sum(1 for x in stale if not x)} fresh, {sum(1 for x in stale if x)} stale (max {max(stale)}); "
               f"weights {min(weights):.3g}–{max(weights):.3g}")
    full = ", ".join(f"{x['site']} (r{x['round'] + 1}, w={x['weight']:.3g}"
                     + (f", stale {x['staleness']}" if x["staleness"] else "") + ")" for x in cs)
    return [_e(f"v{g['version']}") + (" <span class='pill ok'>final</span>" if g["final"] else ""),
            _when(g["signed_at"]),
            _fmt(durs[g["version"]] / ddiv, ".3g") if g["version"] in durs else "–",
            f"{_e(summary)}<details><summary>every contribution</summary><span class='muted'>{_e(full)}</span></details>",
            _e(rule_label((g["report"] or {}).get("rule"), d["config"]["aggregation"])),
            _e((g["report"] or {}).get("reason") or "")]


def _updates(d: dict[str, Any]) -> str:
    """Past SCALE_SITES sites: one row per round (counts, loss quantiles), then every update folded away."""
    if not at_scale(d):
        return _update_table(d)
    rows = [[str(r["round"]), str(r["updates"]), str(r["aggregated"]), str(r["pending"]),
             f"<span class='pill bad'>{r['rejected']}</span>" if r["rejected"] else "0",
             _fmt(r["loss_q10"]), _fmt(r["loss_median"]), _fmt(r["loss_q90"]), str(r["stale_updates"]),
             _fmt(r["staleness_max"])] for r in round_summary(d)]
    return (_table(["Round", "Updates", "Aggregated", "Pending", "Rejected", "Loss 10th pct", "Loss median",
                    "Loss 90th pct", "Stale updates", "Max staleness"], rows, num=set(range(1, 10)))
            + f"<details id='all-updates'><summary>Every update ({len(d['updates'])} rows)</summary>"
            + _update_table(d) + "</details>")


def _update_table(d: dict[str, Any]) -> str:
    """One row per update manifest: what it was trained from, its fate and its metrics."""
    rows = []
    for u in sorted(d["updates"], key=lambda u: (u["round"], u["site"])):
        n = u["named"]
        state = {"aggregated": f"<span class='pill ok'>in v{u['version']}</span>",
                 "rejected": "<span class='pill bad'>rejected</span>",
                 "pending": "<span class='pill warn'>pending</span>"}[u["state"]]
        if u["reason"]:
            state += f" <span class='reason'>{_e(short_reason(u['key'], u['reason']))}</span>"
        rows.append([_e(u["site"]), _e(str(u["round"] + 1)), _e(f"v{u['base_version']}"),
                     _fmt(u["staleness"]), _fmt(u["weight"]), _fmt(n["train_loss"]), _fmt(n["pseudo_dice"], ".3f"),
                     _fmt(n["epoch_time"], ".3g"), state])
    return _table(["Site", "Round", "Trained from", "Staleness", "Weight", "Train loss", "Pseudo-Dice",
                   "Epoch time (s)", "State"], rows, num={3, 4, 5, 6, 7})


def _fingerprint(d: dict[str, Any]) -> str:
    """The merged fingerprint, or why there is none."""
    fp = d["fingerprint"]
    mode = d["config"]["mode"]
    if mode == "asym":  # what happens to fingerprints in each mode, said once
        return ("<p class='lead'>AsymFedAvg: no fingerprint is merged. Each site plans from its own nnU-Net "
                "fingerprint, computed and kept at the site; the plans each site published are below.</p>")
    if mode == "fedavg":
        return "<p class='lead'>FedAvg of a plain PyTorch model: no fingerprint phase.</p>"
    lead = ("<p class='lead'>FFE: the sites' fingerprint summaries (no image leaves a site) are merged into one "
            "federation-wide nnU-Net fingerprint, from which every site plans, so all hold the same plans.</p>")
    if fp is None:
        return lead + "<p class='muted'>The merged fingerprint is not published yet.</p>"
    props = ["mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5"]
    irows = [[_e(ch)] + [_fmt(p.get(k), ".4g") for k in props] for ch, p in fp["intensity"].items()]
    census_rows = ", ".join(f"{_e(s)}: {n}" for s, n in sorted((d["census"] or {}).get("sites", {}).items()))
    spacing = fp["spacing"] or {}
    return lead + (
        _table(["Fingerprint", ""], [
            ["Cases in the merged fingerprint", _fmt(fp["cases_in_fingerprint"])],
            ["Cases per site (census)", census_rows or "–"],
            ["Channels", _fmt((d["census"] or {}).get("num_channels"))],
            ["Median spacing" + (" (2D: in-plane)" if fp.get("dims") == 2 else ""),
             _dims(spacing.get("median"), ".4g")],
            ["Spacing range", (_dims(spacing.get("min"), ".4g") + " … " + _dims(spacing.get("max"), ".4g"))
             if fp["spacing"] else "–"],
            ["Median shape after cropping", _dims((fp["shape"] or {}).get("median"), ".4g")],
            ["Median relative size after cropping", _fmt(fp["median_relative_size_after_cropping"], ".3g")],
        ], cls="kv") + "<h3 style='font-size:14px;margin:14px 0 0'>Foreground intensity per channel</h3>"
        + _table(["Channel", "Mean", "Median", "Std", "Min", "Max", "0.5th pct", "99.5th pct"], irows,
                 num=set(range(1, 8))))


def _plans(d: dict[str, Any]) -> str:
    """One column per group of sites holding the same plans, one row per field."""
    sites = d["config"]["sites"]
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
    if not columns:
        return "<p class='muted'>No plans published yet.</p>"
    labels = list(dict.fromkeys(k for col in columns for k in col))
    note = ("All sites hold identical plans (same digest)." if len(groups) == 1 and len(sites) > 1 else
            "One column per plans digest, with the sites that hold it.")
    return (f"<p class='lead'>{_e(note)}</p>"
            + _table(["Sites"] + [names_line(m) if at_scale(d) else ", ".join(m) for m in groups.values()],
                     [[_e(k)] + [col.get(k, "–") for col in columns] for k in labels], cls="kv"))


def _sharing(d: dict[str, Any], plots: dict[str, Any]) -> str:
    """AsymFedAvg only: how much of each site's network is averaged, overall and layer by layer."""
    if d["config"]["mode"] != "asym":
        return ""
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
    return (
        "<section id='sharing'><h2>Layers AsymFedAvg shares</h2>"
        f"<p class='lead'>From the aggregator's report in global v{_e(v)}: a tensor is averaged when another site's "
        "network has the same layer with the same shape; the rest stays with the site.</p>"
        + "<div style='max-width:640px'>" + _figure(plots, "plot-sharing", "Green: averaged across sites; grey: kept by the site alone.") + "</div>"
        + (_table(["Site", "Shared tensors", "Tensors", "Shared parameters", "Parameters", "Shared"], srows,
                  num={1, 2, 3, 4, 5}) if srows else "<p class='muted'>No aggregation yet.</p>")
        + layer_html + "</section>")


def _problems(d: dict[str, Any]) -> str:
    """Files a party rejected, then files this report could not verify."""
    rj = [[f"<code>{_e(x['key'])}</code>", _e(x["by"]),
           f"<span class='reason'>{_e(short_reason(x['key'], x['reason']))}</span>",
           _when(x["at"])] for x in d["rejected"]]
    listed = {x["key"] for x in d["rejected"]}
    pr = [[f"<code>{_e(p['key'])}</code>", "this report",
           f"<span class='reason'>{_e(short_reason(p['key'], p['error']))}</span>", "–"]
          for p in d["problems"] if p["key"] not in listed]
    return (_table(["File", "Rejected by", "Reason", "At (UTC)"], rj + pr) if rj or pr
            else "<p><span class='pill ok'>none</span> Every file in the bucket verified.</p>")
