"""The one output shape of every benchmark, and the helpers that build it.

Every script in ``benchmarks/`` prints one JSON object::

    {"benchmark": NAME, ...its figures...,
     "targets": {name: {"rule": str, "value": number | str, "met": bool}},
     "all_targets_met": bool}

``targets`` is the contract: ``run_all.py`` renders it as each section's targets table, and
``tests/test_benchmarks_shape.py`` checks every stored result against it. ``all_targets_met`` is
derived from it (a script's exit status and the page's summary read it). The scripts are run as
``python benchmarks/NAME.py`` (this folder is then first on ``sys.path``) or loaded by path from
the tests, so each puts this folder on ``sys.path`` before importing this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["NOT_MEASURED", "TARGET_FIELDS", "all_met", "benchmark_output", "shape_problems", "target"]

TARGET_FIELDS = ("rule", "value", "met")
NOT_MEASURED = "not measured"  # the value of a target whose figure is missing (an arm failed or was not run)


def target(rule: str, value: float | int | str | None, met: bool) -> dict[str, Any]:
    """One target: the rule in words, the figure it judges, and whether it holds.

    A missing figure (``value`` None) is reported as :data:`NOT_MEASURED` and not met: a target
    holds only when it was shown to hold.
    """
    if value is None:
        return {"rule": rule, "value": NOT_MEASURED, "met": False}
    return {"rule": rule, "value": value, "met": bool(met)}


def all_met(targets: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether every target holds."""
    return all(t["met"] for t in targets.values())


def benchmark_output(benchmark: str, figures: Mapping[str, Any],
                     targets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON object a benchmark prints: its name first, its figures, then its targets."""
    return {"benchmark": benchmark, **figures, "targets": dict(targets), "all_targets_met": all_met(targets)}


def shape_problems(data: Any) -> list[str]:
    """What keeps ``data`` from the one shape (empty when it conforms)."""
    if not isinstance(data, Mapping):
        return [f"not a JSON object but {type(data).__name__}"]
    problems = [] if isinstance(data.get("benchmark"), str) else ["no 'benchmark' name"]
    targets = data.get("targets")
    if not isinstance(targets, Mapping) or not targets:
        return problems + ["no 'targets' map"]
    for name, t in targets.items():
        if not isinstance(t, Mapping) or tuple(sorted(t)) != tuple(sorted(TARGET_FIELDS)):
            problems.append(f"target {name!r} is not {{rule, value, met}}: {t!r}")
            continue
        if not isinstance(t["rule"], str):
            problems.append(f"target {name!r}: rule is not a string")
        if isinstance(t["value"], bool) or not isinstance(t["value"], (int, float, str)):
            problems.append(f"target {name!r}: value is not a number or a string")
        if not isinstance(t["met"], bool):
            problems.append(f"target {name!r}: met is not a boolean")
    if not any(p.startswith("target") for p in problems) and data.get("all_targets_met") is not all_met(targets):
        problems.append("all_targets_met does not follow from targets")
    return problems
