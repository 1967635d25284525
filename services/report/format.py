"""How the report page writes numbers, names and units: percentages, points, seconds, the models' and
attacks' names and their order."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

from services.report import plots

MODEL_ORDER = ["vanilla", "control", "fgsm_at", "pgd_at", "trades", "ladder", "trades_ladder", "ladder_random",
               "ladder_cavrandom"]
MODEL_NAMES = {"vanilla": "Vanilla", "control": "Control", "fgsm_at": "FGSM-AT", "pgd_at": "PGD-AT", "trades": "TRADES",
               "ladder": "LADDER", "trades_ladder": "TRADES+LADDER", "ladder_random": "LADDER_Random",
               "ladder_cavrandom": "LADDER_cavRandom"}
ATTACK_ORDER = ["fgsm", "jsma", "pgd", "cw", "autoattack", "ladder"]
ATTACK_NAMES = {"fgsm": "FGSM", "jsma": "JSMA", "pgd": "PGD", "cw": "CW-L2", "autoattack": "AutoAttack", "ladder": "LADDER"}
SETTING_ORDER = ["blackbox", "whitebox"]
SETTING_NAMES = {"blackbox": "Black-box", "whitebox": "White-box"}
DASH = "–"  # the paper's mark for the attack a model was trained on
MINUS = "−"
PCT = "\u00a0%"  # a percentage unit that never wraps alone onto the next line
FIDELITY_GAP = 0.05  # warn when reconstructions are classified this much (fraction) worse than originals


# ---------------------------------------------------------------- formatting


def num(v: Any) -> float | None:
    """A finite float, or None for null / NaN / ±inf / non-numbers."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def pct(v: Any, unit: str = "") -> str:
    """A fraction as a percentage with 2 decimals ("n/a" when missing)."""
    v = num(v)
    return "n/a" if v is None else f"{100 * v:.2f}{unit}"


def points(delta: float) -> str:
    """A difference of fractions in signed percentage points."""
    d = 100 * delta
    if round(d, 2) == 0:
        return "±0.00"
    return f"+{d:.2f}" if d > 0 else f"{MINUS}{-d:.2f}"


def fmt(v: Any) -> str:
    """Any value of the report, short."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4g}" if v != 0 else "0"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v) if all(not isinstance(x, (dict, list)) for x in v) else json.dumps(v)
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False, allow_nan=True)
    return str(v)


def count(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else fmt(v)


def seconds(s: Any) -> str:
    v = num(s)
    if v is None:
        return "n/a"
    if v < 100:
        return f"{v:.1f} s"
    m, sec = divmod(round(v), 60)
    return f"{v:.0f} s ({m} min {sec:02d} s)"


def kv(d: Mapping | None, labels: Mapping[str, str] | None = None, skip: tuple = ()) -> list[tuple[str, str]]:
    """(label, value) rows of a flat dict; keys naming an accuracy or a rate show as %."""
    rows = []
    for k, v in (d or {}).items():
        if k in skip:
            continue
        label = (labels or {}).get(k, k.replace("_", " "))
        if "accuracy" in k or (k.endswith("rate") and num(v) is not None):
            rows.append((label, pct(v, PCT)))
        else:
            rows.append((label, fmt(v)))
    return rows


def ordered(keys, order: list[str]) -> list[str]:
    keys = list(dict.fromkeys(keys))
    return [k for k in order if k in keys] + [k for k in keys if k not in order]


def model_name(key: str) -> str:
    return MODEL_NAMES.get(key, key)


def img(png: bytes, alt: str) -> dict:
    return {"src": "data:image/png;base64," + base64.b64encode(png).decode("ascii"), "alt": alt,
            "width": plots.display_width(png)}


# ---------------------------------------------------------------- report access
