"""The audit's rules: per check, whether it runs, its warn and fail thresholds, and classes to ignore.

Rules come from :data:`RULES` (the defaults), overridden by a YAML mapping of
check names to settings, in a file (``smoothgrad-audit audit --rules FILE``)
or under the run config's ``audit_rules`` key::

    border_attention: {warn: 2.0, fail: 3.0, ignore_classes: [7]}
    unconverged_maps: {enabled: false}
    shortcut_region: {margin: 0.3}

Every check takes ``enabled`` (default true), ``warn`` and ``fail`` (a number,
or null for never) and ``ignore_classes`` (classes whose entries always pass);
a few take one more setting (:attr:`Rule.extra`). A check's measure is compared
with its thresholds in its :attr:`Rule.direction`: ``above`` warns when the
measure reaches ``warn`` (error rates), ``below`` when it falls under it
(agreements). A wrong rule is one :class:`RulesError` line naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any


from pipelines.audit.findings import Check


class RulesError(ValueError):
    """A mistake in the audit rules; its message is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One check's rule: what it measures, its thresholds and its extra settings."""

    check: str
    measure: str
    direction: str                    # "above": worse when higher; "below": worse when lower
    warn: float | None
    fail: float | None
    extra: dict = dataclasses.field(default_factory=dict)   # name -> (default, meaning)
    per_class: bool = True


#: The default rules, in the order the documentation lists them.
RULES = {rule.check: rule for rule in (
    Rule("shortcut_region", "share of a class's maps whose mass sits in its candidate region (a candidate from "
         "warn; confirmed by counterfactuals it fails from fail, unconfirmed it passes)", "above", 0.2, 0.2,
         {"margin": (0.2, "how much the counterfactual effect must exceed the random-region control's")}),
    Rule("strategy_clusters", "number of strategy clusters among a class's sampled maps (shown, never a problem "
         "by default)", "above", None, None),
    Rule("border_attention", "a class's mean border mass divided by the frame's share of the image area", "above",
         1.5, None),
    Rule("unconverged_maps", "share of maps estimated below the reliability target", "above", 0.25, 0.5,
         per_class=False),
    Rule("confident_mistakes", "share of labelled records mispredicted at least as confidently as typical correct "
         "predictions", "above", 0.05, None, per_class=False),
    Rule("error_rate", "share of records that ended as error rows", "above", 0.01, 0.05, per_class=False),
    Rule("class_accuracy", "how far a class's accuracy lies below the overall accuracy", "above", 0.2, None),
    Rule("drift_class_mean", "rank correlation of a class's mean map with the previous run's", "below", 0.92, 0.8),
    Rule("drift_map_agreement", "median rank correlation of a key's pooled map with the previous run's, over keys "
         "sampled in both runs", "below", 0.9, 0.7,
         {"agreement": (0.8, "a key counts as changed below this rank correlation")}, per_class=False),
    Rule("drift_prediction_flips", "share of keys in both runs whose predicted class changed", "above", 0.02, 0.1,
         per_class=False),
    Rule("drift_statistics", "largest effect size (absolute Cliff's delta) of a map statistic's shift in a class, among "
         "shifts significant at p_value", "above", 0.3, 0.5,
         {"p_value": (0.01, "two-sample Kolmogorov-Smirnov p-value below which a shift counts")}),
    Rule("drift_new_shortcut", "shortcut candidates confirmed in this run and not in the previous one", "above",
         None, 1.0),
)}
#: Settings every check takes.
COMMON = ("enabled", "warn", "fail", "ignore_classes")


def _number(where: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RulesError(f"audit rule '{where}': expected a number or null; got {value!r}.")
    return float(value)


def parse(raw: Any, source: str = "audit_rules") -> dict:
    """The rules: :data:`RULES` with ``raw`` (a mapping, or None) applied; raises :class:`RulesError`.

    Returns:
        ``{check: {"enabled": bool, "warn": float | None, "fail": float | None,
        "ignore_classes": [int], **extra}}`` for every check.
    """
    rules = {name: {"enabled": True, "warn": rule.warn, "fail": rule.fail, "ignore_classes": [],
                    **{key: default for key, (default, _) in rule.extra.items()}}
             for name, rule in RULES.items()}
    if raw is None:
        return rules
    if not isinstance(raw, dict):
        raise RulesError(f"{source}: expected a mapping of check names to settings; got {type(raw).__name__}.")
    for name, settings in raw.items():
        if name not in RULES:
            raise RulesError(f"{source}: unknown check '{name}'; checks: {', '.join(RULES)}.")
        if settings is None:
            continue
        if not isinstance(settings, dict):
            raise RulesError(f"audit rule '{name}': expected a mapping of settings; got {settings!r}.")
        rule = RULES[name]
        for key, value in settings.items():
            where = f"{name}.{key}"
            if key == "enabled":
                if not isinstance(value, bool):
                    raise RulesError(f"audit rule '{where}': expected true or false; got {value!r}.")
                rules[name][key] = value
            elif key in ("warn", "fail") or key in rule.extra:
                number = _number(where, value)
                if number is None and key in rule.extra:
                    raise RulesError(f"audit rule '{where}': expected a number; got null.")
                rules[name][key] = number
            elif key == "ignore_classes":
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in values):
                    raise RulesError(f"audit rule '{where}': expected a list of class indices (whole numbers "
                                     f">= 0); got {value!r}.")
                rules[name][key] = sorted(set(values))
            else:
                allowed = ", ".join(COMMON + tuple(rule.extra))
                raise RulesError(f"audit rule '{where}': unknown setting '{key}'; allowed: {allowed}.")
        warn, fail = rules[name]["warn"], rules[name]["fail"]
        if warn is not None and fail is not None and (fail < warn if rule.direction == "above" else fail > warn):
            relation = "at least" if rule.direction == "above" else "at most"
            raise RulesError(f"audit rule '{name}.fail': expected {relation} warn ({warn}); got {fail}.")
    return rules


def load(path: str) -> dict:
    """The rules of a YAML file (local or ``gs://``); raises :class:`RulesError` on a bad file or rule."""
    return parse(load_raw(path), source=f"--rules {path}")


def load_raw(path: str) -> dict:
    """The checked overrides of a YAML rules file, as written (a mapping); raises :class:`RulesError`."""
    from transforms.support.storage import read_yaml

    try:
        data = read_yaml(path, "--rules")
    except ValueError as error:
        raise RulesError(str(error)) from None
    parse(data, source=f"rules file {path}")
    return data or {}


def status(rules: dict, check: str, measure: float | None) -> str:
    """``pass``, ``warn`` or ``fail`` of ``measure`` under ``check``'s thresholds (None or NaN: pass)."""
    rule = rules[check]
    if measure is None or measure != measure:
        return "pass"
    worse = (lambda limit: measure >= limit) if RULES[check].direction == "above" else (lambda limit: measure < limit)
    if rule["fail"] is not None and worse(rule["fail"]):
        return "fail"
    if rule["warn"] is not None and worse(rule["warn"]):
        return "warn"
    return "pass"


def threshold(rules: dict, check: str) -> float | None:
    """The threshold a check's entries report: ``warn``, or ``fail`` when there is no warn level."""
    rule = rules[check]
    return rule["warn"] if rule["warn"] is not None else rule["fail"]


def apply(rules: dict, checks: list[Check]) -> list[Check]:
    """Turned-off checks replaced by one passing "not checked" entry; ignored classes' entries passing."""
    out, off = [], set()
    for entry in checks:
        rule = rules.get(entry.check)
        if rule is None:
            out.append(entry)
        elif not rule["enabled"]:
            if entry.check not in off:
                off.add(entry.check)
                out.append(Check(entry.check, "pass", f"Not checked: turned off by the audit rules "
                                                      f"({entry.check}: {{enabled: false}})."))
        elif entry.target is not None and entry.target in rule["ignore_classes"]:
            out.append(dataclasses.replace(entry, status="pass", summary=f"Ignored by the audit rules "
                                           f"({entry.check}.ignore_classes): {entry.summary}"))
        else:
            out.append(entry)
    return out


def table() -> str:
    """The defaults as a Markdown table (for the documentation)."""
    def show(value):
        return "never" if value is None else f"{value:g}"

    lines = ["| check | measure | worse when | warn | fail | other settings |", "|---|---|---|---:|---:|---|"]
    for rule in RULES.values():
        extra = "; ".join(f"`{key}` {default:g}: {meaning}" for key, (default, meaning) in rule.extra.items())
        lines.append(f"| `{rule.check}` | {rule.measure} | {rule.direction} | {show(rule.warn)} | "
                     f"{show(rule.fail)} | {extra or '–'} |")
    return "\n".join(lines)
