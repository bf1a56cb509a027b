"""``_FINDINGS.json``: the audit's verdict, a contract like the corpus columns.

::

    {"run_id": str, "status": "pass" | "warn" | "fail",        # the worst check
     "checks": [{"check": str, "status": "pass" | "warn" | "fail",
                 "class": int | null, "region": [y0, x0, y1, x1] | null,   # input pixels, end exclusive
                 "measure": float | null, "threshold": float | null,
                 "confirmed": bool | null,       # counterfactual outcome of a region check
                 "keys": [str, ...],             # affected keys, at most MAX_KEYS
                 "keys_total": int, "summary": str}]}   # one sentence a person can act on

Every check appears, passing or not, so that "checked and fine" differs from
"not checked". :data:`FINDINGS_SCHEMA` is the JSON Schema of the file.
"""

from __future__ import annotations

import dataclasses
import json
import math

from apache_beam.io.filesystems import FileSystems

FINDINGS = "_FINDINGS.json"
STATUSES = ("pass", "warn", "fail")
#: Affected keys listed per check; ``keys_total`` counts them all.
MAX_KEYS = 1000

FINDINGS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "smoothgrad-audit _FINDINGS.json",
    "type": "object",
    "required": ["run_id", "status", "checks"],
    "additionalProperties": False,
    "properties": {
        "run_id": {"type": "string"},
        "status": {"enum": list(STATUSES)},
        "checks": {"type": "array", "items": {
            "type": "object",
            "required": ["check", "status", "class", "region", "measure", "threshold", "confirmed", "keys",
                         "keys_total", "summary"],
            "additionalProperties": False,
            "properties": {
                "check": {"type": "string", "minLength": 1},
                "status": {"enum": list(STATUSES)},
                "class": {"type": ["integer", "null"]},
                "region": {"oneOf": [{"type": "null"}, {"type": "array", "items": {"type": "integer", "minimum": 0},
                                                        "minItems": 4, "maxItems": 4}]},
                "measure": {"type": ["number", "null"]},
                "threshold": {"type": ["number", "null"]},
                "confirmed": {"type": ["boolean", "null"]},
                "keys": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_KEYS},
                "keys_total": {"type": "integer", "minimum": 0},
                "summary": {"type": "string", "minLength": 1},
            },
        }},
    },
}


@dataclasses.dataclass
class Check:
    """One entry of ``_FINDINGS.json`` (see the module docstring for each field)."""

    check: str
    status: str
    summary: str
    target: int | None = None
    region: list | None = None
    measure: float | None = None
    threshold: float | None = None
    confirmed: bool | None = None
    keys: list = dataclasses.field(default_factory=list)
    keys_total: int | None = None

    def as_dict(self) -> dict:
        """The check as the file holds it (keys cut to :data:`MAX_KEYS`, NaN as null)."""
        def number(value):
            return None if value is None or not math.isfinite(float(value)) else float(value)

        keys = [str(key) for key in self.keys]
        return {"check": self.check, "status": self.status,
                "class": None if self.target is None else int(self.target),
                "region": None if self.region is None else [int(edge) for edge in self.region],
                "measure": number(self.measure), "threshold": number(self.threshold),
                "confirmed": None if self.confirmed is None else bool(self.confirmed),
                "keys": keys[:MAX_KEYS], "keys_total": int(len(keys) if self.keys_total is None else self.keys_total),
                "summary": self.summary}


def worst(statuses) -> str:
    """The most severe of ``statuses`` (``pass`` when there is none)."""
    return max(statuses, key=STATUSES.index, default="pass")


def rank(checks: list[dict]) -> list[dict]:
    """Checks ordered for a reader: failures first, then warnings, each by class, passes last."""
    return sorted(checks, key=lambda check: (-STATUSES.index(check["status"]), check["check"],
                                             -1 if check["class"] is None else check["class"]))


def findings(run_id: str, checks: list[Check]) -> dict:
    """The ``_FINDINGS.json`` document of ``checks``."""
    entries = rank([check.as_dict() for check in checks])
    return {"run_id": str(run_id), "status": worst(entry["status"] for entry in entries), "checks": entries}


def write(run_dir: str, document: dict) -> str:
    """Writes ``document`` as ``run_dir/_FINDINGS.json`` (replaced whole: a reader never sees a part); returns its path."""
    from transforms.support import storage

    return storage.replace(FileSystems.join(run_dir, FINDINGS), json.dumps(document, indent=2).encode("utf-8"))


def read(run_dir: str) -> dict | None:
    """A run's ``_FINDINGS.json``, or None when it has none."""
    path = FileSystems.join(run_dir, FINDINGS)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))
