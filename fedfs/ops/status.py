"""``fedfs status``: where a federation stands, read from the bucket alone.

:func:`collect_status` reads a constant number of small signed files, however
long the federation has run: ``federation.json``, the ``latest`` hint plus one
probe, the current global manifest, and per site its heartbeat, plans, status
document and a few probes around the update cursor the current global names
(``next_rounds``). Every file is verified like any reader verifies it; one
that does not verify is reported under ``problems`` and never stops the report.

:func:`render_status` turns the dict into a rich table for people; ``--json``
prints the dict for machines.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..protocol import layout
from ..protocol.timestamps import format_stamp
from ..protocol.timestamps import parse_stamp_or_none
from .reader import VerifiedReader

if TYPE_CHECKING:
    from ..federation import Federation
    from ..protocol.schema import FederationConfig

__all__ = ["collect_status", "render_status", "short_reason", "pick_metrics", "federation_summary", "METRIC_NAMES",
           "SILENT_AFTER_S", "age_s", "aggregator_liveness", "is_silent", "rule_label", "dice_by_target",
           "format_targets"]

#: The metrics ``fedfs status`` shows, and the names sites may report them under.
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "train_loss": ("train_loss",),
    "pseudo_dice": ("pseudo_dice", "val_pseudo_dice"),
    "epoch_time": ("epoch_time_s", "epoch_time"),
}
#: A running party refreshes its heartbeat every minute (``fedfs.roles.heartbeat``), from a thread
#: while its daemon runs and during each step. A heartbeat older than this (ten refreshes) while the
#: federation runs means the party was killed, hangs, or its machine is off: status and report flag it
#: "silent". A party run from cron less often than this shows as silent between its runs.
SILENT_AFTER_S = 600.0
#: How far past the cursor, and how far before it, status looks for a site's newest update.
_PROBE_AHEAD = 4
_PROBE_BACK = 3


def short_reason(key: str, reason: str) -> str:
    """A rejection reason without the leading location (``<bucket url>/<key>: ``) a table already shows."""
    marker = f"{key}: "
    i = reason.find(marker)
    return reason[i + len(marker):] if 0 <= i <= 1024 else reason


def federation_summary(c: FederationConfig) -> dict[str, Any]:
    """The settings a status table or report heads with (mode, rounds, parties), JSON-ready."""
    return {"mode": c.mode, "aggregation": c.aggregation, "configuration": c.configuration, "rounds": c.rounds,
            "local_epochs": c.local_epochs, "aggregator": c.aggregator.name, "sites": c.site_names}


def rule_label(rule: str | None, aggregation: str) -> str:
    """The rule a global was made with (its manifest's ``report.rule``), as people read it. In an async
    federation a global of only fresh updates at eta 1 is made by FedAvg (FedBuff reduces to it), so
    "FedAvg" there says why."""
    if not rule:
        return "initial"
    if aggregation == "async" and rule == "FedAvg":
        return "FedAvg (async; every update fresh at eta 1, where FedBuff is FedAvg)"
    return rule


def pick_metrics(metrics: dict[str, float] | None) -> dict[str, float | None]:
    """The named metrics (train_loss, pseudo_dice, epoch_time) from a manifest's or heartbeat's metrics."""
    metrics = metrics or {}
    out: dict[str, float | None] = {}
    for name, aliases in METRIC_NAMES.items():
        out[name] = next((float(metrics[a]) for a in aliases if a in metrics), None)
    return out


def dice_by_target(metrics: dict[str, float] | None) -> dict[str, float]:
    """nnU-Net's pseudo-Dice per label or region, by dataset.json's names (a site reports them as
    ``dice_<name>``, :func:`fedfs.nnunet.inference.named_dice`), in name order (the manifests are
    canonical JSON, which sorts keys)."""
    return {k[len("dice_"):]: float(v) for k, v in (metrics or {}).items()
            if k.startswith("dice_") and len(k) > 5 and isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_targets(by_target: dict[str, float], fmt: str = "{:.3f}") -> str:
    """``"whole 0.912, core 0.640"``; empty for one target or none (the mean says it all)."""
    return ", ".join(f"{name} {fmt.format(v)}" for name, v in by_target.items()) if len(by_target) > 1 else ""


def is_silent(phase: str | None, age_s: float | None, final: bool) -> bool:
    """True for a party whose last heartbeat is older than :data:`SILENT_AFTER_S` while it still has
    work to do (not "done", and for the aggregator: the federation not final)."""
    return age_s is not None and age_s > SILENT_AFTER_S and not final and phase != "done"


def age_s(stamp: str | None, now: float) -> float | None:
    """Seconds from a protocol stamp (a file's ``signed_at``) to ``now``; None without a stamp."""
    t = parse_stamp_or_none(stamp) if stamp else None
    return None if t is None else round(max(0.0, now - t), 1)


def aggregator_liveness(r: VerifiedReader, name: str, *, final: bool, global_age_s: float | None,
                        waiting: list[str], now: float) -> dict[str, Any]:
    """The aggregator's heartbeat and last activity (its heartbeat or newest global, whichever is
    newer); "dead" when that is older than SILENT_AFTER_S while ``waiting`` (updates, sites) need it."""
    from ..protocol.schema import Heartbeat

    hb = r.read(layout.AGG_HEARTBEAT, Heartbeat)
    hb_age = age_s(hb.signed_at if hb else None, now)
    ages = [a for a in (hb_age, global_age_s) if a is not None]
    activity = min(ages) if ages else None
    phase = hb.doc.phase if hb else None
    return {"name": name, "phase": phase, "message": hb.doc.message if hb else "",
            "heartbeat_at": hb.signed_at if hb else None, "heartbeat_age_s": hb_age, "activity_age_s": activity,
            "waiting_on_it": waiting, "dead": bool(waiting) and is_silent(phase, activity, final)}


def _waiting_on_aggregator(sites: dict[str, Any]) -> list[str]:
    """Sites' updates not yet folded, and live sites waiting with no update out (set-up, v0)."""
    out = [f"{n}'s update r{s['last_update']['round']}" for n, s in sites.items()
           if s["last_update"] is not None and not s["last_update"]["aggregated"]]
    return out + [f"{n} ({s['message'] or 'waiting'})" for n, s in sites.items()
                  if s["phase"] == "waiting" and not s["silent"] and s["last_update"] is None]


def _latest_version(r: VerifiedReader) -> int | None:
    from ..protocol.schema import GlobalManifest, LatestHint

    hint = r.read(layout.LATEST, LatestHint)
    return layout.newest_version(hint.doc.version if hint is not None else None,
                                 lambda key: r.read(key, GlobalManifest) is not None)


def _latest_update(r: VerifiedReader, site: str, cursor: int) -> Any:
    """The site's newest verifiable update near ``cursor``: ahead of it if any, else just before."""
    from ..protocol.schema import UpdateManifest

    newest = None
    for n in range(cursor, cursor + _PROBE_AHEAD):
        found = r.read(layout.site_update(site, n), UpdateManifest)
        if found is None:
            break
        newest = found
    if newest is not None:
        return newest
    for n in range(cursor - 1, max(-1, cursor - 1 - _PROBE_BACK), -1):
        found = r.read(layout.site_update(site, n), UpdateManifest)
        if found is not None:
            return found
    return None


def _declared_cases(r: VerifiedReader, c: Any, plans: dict[str, Any]) -> dict[str, int | None]:
    """Each site's declared training-case count: the newest merged census's (FFE), else its plans'."""
    from ..protocol.schema import Census

    cases: dict[str, int | None] = {s: None for s in c.site_names}
    newest = layout.newest_revision(layout.census_key, None, r.exists) if c.mode == "ffe" else None
    census = r.read(layout.census_key(newest), Census) if newest is not None else None
    for site in c.site_names:
        n = census.doc.sites.get(site) if census is not None else None
        if n is None and plans.get(site) is not None:
            n = plans[site].doc.summary.get("num_cases")
        cases[site] = n if isinstance(n, int) and not isinstance(n, bool) else None
    return cases


def weight_shares(c: Any, cases: dict[str, int | None]) -> dict[str, float | None]:
    """Each site's share of a global's weight when every site contributes (before any training:
    what a case count buys), by the federation's weighting; None where a count is not known yet."""
    if c.weighting != "cases":
        return {s: 1.0 / len(cases) for s in cases}
    if any(n is None for n in cases.values()):
        return {s: None for s in cases}
    total = sum(n for n in cases.values() if n is not None) or 1
    return {s: n / total for s, n in cases.items() if n is not None}


def collect_status(fed: Federation, now: float | None = None) -> dict[str, Any]:
    """The federation's state as a JSON-ready dict, from a bounded number of bucket reads."""
    from ..protocol.schema import GlobalManifest, Heartbeat, PlansDocument

    now = time.time() if now is None else now
    c = fed.config
    r = VerifiedReader(fed)

    version = _latest_version(r)
    current = r.read(layout.global_version(version), GlobalManifest) if version is not None else None
    glob: dict[str, Any] = {"version": version, "final": False, "published_at": None, "age_s": None,
                            "contributions": [], "rule": None, "reason": None}
    next_rounds: dict[str, int] = {}
    if current is not None:
        doc = current.doc
        glob.update(
            final=doc.is_final(c.rounds),
            published_at=current.signed_at,
            age_s=age_s(current.signed_at, now),
            contributions=[{"site": x.site, "round": x.round, "base_version": x.base_version,
                            "staleness": x.staleness, "weight": x.weight} for x in doc.contributions],
            rule=doc.report.get("rule"),
            reason=doc.report.get("reason") or doc.report.get("init"),
        )
        next_rounds = dict(doc.next_rounds)

    rejected_by_agg = r.rejections(layout.AGG_STATUS)

    sites: dict[str, Any] = {}
    digests: dict[str, str] = {}
    def site_files(site: str) -> tuple[Any, Any, list[dict[str, str]], Any]:
        return (r.read(layout.site_plans(site), PlansDocument), r.read(layout.site_heartbeat(site), Heartbeat),
                r.rejections(layout.site_status(site), site), _latest_update(r, site, next_rounds.get(site, 0)))

    files = _per_site(site_files, c.site_names, 1 if fed.store.local_path else STATUS_READ_THREADS)
    all_plans = {site: files[site][0] for site in c.site_names}
    cases = _declared_cases(r, c, all_plans)
    shares = weight_shares(c, cases)
    for site in c.site_names:
        plans, hb, own_rejected, update = files[site]
        if hb is not None:
            phase = hb.doc.phase
        elif r.failed(layout.site_heartbeat(site)):
            phase = "unknown (heartbeat does not verify)"
        else:
            phase = _inferred_phase(r, site, plans)
        trained_from = update.doc.base_version if update is not None else None
        if trained_from is None and hb is not None and hb.doc.base_version >= 0:
            trained_from = hb.doc.base_version
        metrics_src = update.doc.metrics if update is not None else (hb.doc.metrics if hb is not None else {})
        prefix = layout.site_prefix(site)
        rejected = [x for x in rejected_by_agg if x["key"].startswith(prefix)] + own_rejected
        if plans is not None:
            digests[site] = plans.doc.digest
        hb_age = age_s(hb.signed_at if hb is not None else None, now)
        sites[site] = {
            "phase": phase,
            "message": hb.doc.message if hb is not None else "",
            "heartbeat_at": hb.signed_at if hb is not None else None,
            "heartbeat_age_s": hb_age,
            "silent": is_silent(phase, hb_age, False),
            "trained_from": trained_from,
            "staleness": (version - trained_from) if version is not None and trained_from is not None else None,
            "last_update": None if update is None else {
                "round": update.doc.round, "base_version": update.doc.base_version, "key": update.key,
                "published_at": update.signed_at,
                "aggregated": update.doc.round < next_rounds.get(site, 0)},
            "updates_sent": (update.doc.round + 1) if update is not None else 0,
            "metrics": pick_metrics(metrics_src),
            "pseudo_dice_by_target": dice_by_target(metrics_src),
            "all_metrics": dict(metrics_src),
            "plans": None if plans is None else {"identifier": plans.doc.plans_identifier,
                                                 "digest": plans.doc.digest},
            "rejected": rejected,
            "cases": cases[site],
            "weight_share": shares.get(site),
        }

    setup = {"census": r.exists(layout.CENSUS), "global_fingerprint": r.exists(layout.GLOBAL_FINGERPRINT),
             "plans_identical": (len(set(digests.values())) == 1 if len(digests) == len(c.site_names) else None)}
    return {
        "url": fed.store.url,
        "federation_id": c.federation_id,
        "federation_digest": fed.digest,
        "now": format_stamp(now),
        "federation": federation_summary(c),
        "setup": setup,
        "global": glob,
        "aggregator": aggregator_liveness(r, c.aggregator.name, final=glob["final"], global_age_s=glob["age_s"],
                                          waiting=_waiting_on_aggregator(sites), now=now),
        "silent_after_s": SILENT_AFTER_S,
        "privacy": _privacy(c, current),
        "sites": sites,
        "rejected": [x for x in rejected_by_agg if not x["key"].startswith(layout.SITES + "/")],
        "problems": sorted(r.problems, key=lambda p: p["key"]),  # read concurrently: in key order, not arrival
    }


#: Sites whose files ``collect_status`` reads at once on network storage: each read is a round trip
#: there (about 5 per site), so 1,000 sites read one by one take minutes. A local folder is read on
#: one thread (its reads are CPU-bound: threads only contend for the GIL, 2.7 s vs 1.6 s at N=1,000).
STATUS_READ_THREADS = 16


def _per_site(fn: Any, sites: list[str], threads: int) -> dict[str, Any]:
    """``{site: fn(site)}``, the sites' reads run on ``threads`` threads."""
    if len(sites) < 2 or threads < 2:
        return {s: fn(s) for s in sites}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(sites)), thread_name_prefix="fedfs-status") as pool:
        return dict(zip(sites, pool.map(fn, sites)))


def _privacy(c: FederationConfig, current: Any) -> dict[str, Any]:
    """The robust rule and the DP budget spent (fedfs.privacy.dp), from the newest global's record."""
    from ..privacy.dp import privacy_status

    return privacy_status(c, current.doc.report if current is not None else None)


def _inferred_phase(r: VerifiedReader, site: str, plans: Any) -> str:
    """Without a heartbeat: how far the site got, from its write-once files."""
    if plans is not None:
        return "planned (no heartbeat)"
    if r.exists(layout.site_fingerprint(site)):
        return "fingerprint (no heartbeat)"
    if r.exists(layout.site_census(site)):
        return "census (no heartbeat)"
    return "not started"


# ---- rendering ---------------------------------------------------------------------
def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 90:
        return f"{s}s ago"
    if s < 90 * 60:
        return f"{s // 60}m ago"
    if s < 36 * 3600:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.1f}d ago"


def _num(x: float | None, fmt: str = "{:.4g}") -> str:
    return "-" if x is None else fmt.format(x)


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f}ms" if x < 1 else f"{x:.1f}s" if x < 600 else f"{x / 60:.1f}min"


_PHASE_STYLE = {"training": "cyan", "published": "green", "done": "bold green", "waiting": "yellow",
                "planning": "cyan", "planned": "green", "finishing": "cyan"}


def _liveness_lines(d: dict[str, Any]) -> list[Any]:
    """The aggregator's heartbeat, and a red line per silent party saying what to check."""
    from rich.text import Text

    a = d.get("aggregator") or {}
    limit = human_age(d.get("silent_after_s", SILENT_AFTER_S)).removesuffix(" ago")
    lines: list[Any] = []
    if a:
        beat = (f"{a['phase']}, heartbeat {human_age(a['heartbeat_age_s'])}" if a.get("phase")
                else "no heartbeat yet")
        lines.append(Text(f"Aggregator {a['name']}: {beat}" + (f" ({a['message']})" if a.get("message") else ""),
                          style="bold red" if a.get("dead") else "dim"))
        if a.get("dead"):
            lines.append(Text(f"  DEAD? no sign of the aggregator for {human_age(a['activity_age_s']).removesuffix(' ago')} "
                              f"(over {limit}) while {', '.join(a['waiting_on_it'][:4])} wait(s) for it: is "
                              "`fedfs aggregator run` still running? Restart it; it resumes where it stopped.",
                              style="bold red"))
    for name, s in d["sites"].items():
        if s.get("silent"):
            lines.append(Text(f"Site {name} is silent: its last heartbeat ({s['phase']}) is "
                              f"{human_age(s['heartbeat_age_s'])}, over {limit}: is its `fedfs site run` still "
                              "running? Restart it; it resumes where it stopped.", style="bold red"))
    return lines


def render_status(d: dict[str, Any], *, all_sites: bool = False) -> Any:
    """A rich renderable: federation summary, one row per site, contributions, rejections, problems.

    Past :data:`~fedfs.ops.status_scale.STATUS_ROWS` sites (unless ``all_sites``), counts by phase
    and only the sites that stand out, each with the reason (:mod:`fedfs.ops.status_scale`)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from .status_scale import at_scale, contribution_lines, notable_sites, phase_line

    f, g = d["federation"], d["global"]
    parts: list[Any] = []
    if g["version"] is None:
        where = "set-up: " + ("merged fingerprint out" if d["setup"]["global_fingerprint"]
                              else "census out" if d["setup"]["census"] else "waiting for sites")
        head = f"no global model yet ({where})"
    else:
        state = "final" if g["final"] else f"round {g['version'] + 1} of {f['rounds']} in progress"
        head = f"global v{g['version']} ({state}), published {human_age(g['age_s'])}"
    parts.append(Text.assemble(("fedfs federation ", "bold"), (d["federation_id"][:12], "bold cyan"),
                               f"  {d['url']}\n",
                               f"mode {f['mode']}, {f['aggregation']}, configuration {f['configuration']}, "
                               f"{f['rounds']} rounds x {f['local_epochs']} epoch(s), aggregator {f['aggregator']}\n",
                               (head, "bold green" if g["final"] else "bold")))

    folded = at_scale(d) and not all_sites
    why = notable_sites(d) if folded else {}
    if folded:
        parts.append(Text(phase_line(d), style="bold"))
    title = (f"Sites that stand out ({len(why)} of {len(d['sites'])}; `fedfs status --all` lists every site)"
             if folded else "Sites")
    t = Table(title=title, title_justify="left", expand=False)
    for col, kw in [("Site", {"style": "bold"}), ("Phase", {}), ("Cases (weight)", {"justify": "right"}),
                    ("Heartbeat", {}), ("Trained from", {}),
                    ("Staleness", {"justify": "right"}), ("Train loss", {"justify": "right"}),
                    ("Pseudo Dice", {"justify": "right"}), ("Epoch time", {"justify": "right"}),
                    ("Rejected files", {})] + ([("Shown for", {})] if folded else []):
        t.add_column(col, **kw)
    for name, s in d["sites"].items():
        if folded and name not in why:
            continue
        m = s["metrics"]
        rej = "; ".join(f"{x['key'].rsplit('/', 1)[-1]}: {short_reason(x['key'], x['reason'])}"
                        for x in s["rejected"][-3:])
        if len(s["rejected"]) > 3:
            rej = f"({len(s['rejected'])} in all) " + rej
        beat = Text(human_age(s["heartbeat_age_s"]) + (" SILENT" if s.get("silent") else ""),
                    style="bold red" if s.get("silent") else "")
        targets = format_targets(s.get("pseudo_dice_by_target") or {})  # regions or several labels, by name
        share = s.get("weight_share")
        cases = "-" if s.get("cases") is None else str(s["cases"])
        t.add_row(name, Text(s["phase"], style=_PHASE_STYLE.get(s["phase"], "")),
                  cases + ("" if share is None else f" ({share:.1%})"), beat,
                  "-" if s["trained_from"] is None else f"v{s['trained_from']}",
                  _num(s["staleness"], "{}"), _num(m["train_loss"]),
                  _num(m["pseudo_dice"], "{:.3f}") + (f"\n{targets}" if targets else ""),
                  _seconds(m["epoch_time"]), Text(rej or "-", style="red" if rej else "dim"),
                  *([", ".join(why[name])] if folded else []))
    parts.append(t)
    parts.extend(_liveness_lines(d))
    if d.get("privacy"):  # the robust rule, DP budget and spending (fedfs.privacy.dp)
        from ..privacy.dp import privacy_lines

        parts.extend(Text(line) for line in privacy_lines(d["privacy"]))

    if g["contributions"] and folded:
        parts.append(Text(f"Contributions to v{g['version']} ({rule_label(g['rule'], f['aggregation'])}): "
                          + "\n  ".join(contribution_lines(g))))
    elif g["contributions"]:
        ct = Table(title=f"Contributions to v{g['version']} ({rule_label(g['rule'], f['aggregation'])})",
                   title_justify="left")
        for col in ("Site", "Update", "Trained from", "Staleness", "Weight"):
            ct.add_column(col, justify="left" if col == "Site" else "right")
        for x in g["contributions"]:
            ct.add_row(x["site"], f"r{x['round']}", f"v{x['base_version']}", str(x["staleness"]), f"{x['weight']:.4g}")
        parts.append(ct)
    elif g["version"] is not None:
        parts.append(Text(f"v{g['version']}: {g['reason'] or 'no contributions'}", style="dim"))

    if d["rejected"]:
        parts.append(Text("Aggregator problems:", style="bold red"))
        parts.extend(Text(f"  {x['key']}: {short_reason(x['key'], x['reason'])}", style="red") for x in d["rejected"])
    if d["problems"]:
        parts.append(Text("Files that do not verify (ignored by every party):", style="bold red"))
        parts.extend(Text(f"  {p['key']}: {short_reason(p['key'], p['error'])}", style="red") for p in d["problems"])
    return Group(*parts)
