"""The evaluation report as one self-contained HTML page (schema "ladder.report/2").

`render_html(report, gallery)` reads the report dict a run writes (report.json) and, optionally,
a gallery of generated examples, and returns a page with inline CSS, no scripts, no external
references and every figure embedded as a base64 PNG. The page is deterministic: the same input
gives the same string (no dates; PNGs without metadata).

Sections, in order: identity, summary verdict, Table-2-like accuracy tables per setting
(black-box first), trade-off plot, generated examples, crossing rate per ε, stage timeline,
details (fidelity, boundary, surrogate, AutoAttack, seeds, versions, configuration).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

import jinja2
import numpy as np

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
STAGE_ORDER = ["latents", "boundary", "generator", "adversarial", "finetune", "evaluate", "report"]
DASH = "–"  # the paper's mark for the attack a model was trained on
MINUS = "−"
PCT = "\u00a0%"  # a percentage unit that never wraps alone onto the next line
FIDELITY_GAP = 0.05  # warn when reconstructions are classified this much (fraction) worse than originals

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("services.report", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


# ---------------------------------------------------------------- formatting


def _num(v: Any) -> float | None:
    """A finite float, or None for null / NaN / ±inf / non-numbers."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def pct(v: Any, unit: str = "") -> str:
    """A fraction as a percentage with 2 decimals ("n/a" when missing)."""
    v = _num(v)
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


def _count(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else fmt(v)


def seconds(s: Any) -> str:
    v = _num(s)
    if v is None:
        return "n/a"
    if v < 100:
        return f"{v:.1f} s"
    m, sec = divmod(round(v), 60)
    return f"{v:.0f} s ({m} min {sec:02d} s)"


def _kv(d: Mapping | None, labels: Mapping[str, str] | None = None, skip: tuple = ()) -> list[tuple[str, str]]:
    """(label, value) rows of a flat dict; keys naming an accuracy or a rate show as %."""
    rows = []
    for k, v in (d or {}).items():
        if k in skip:
            continue
        label = (labels or {}).get(k, k.replace("_", " "))
        if "accuracy" in k or (k.endswith("rate") and _num(v) is not None):
            rows.append((label, pct(v, PCT)))
        else:
            rows.append((label, fmt(v)))
    return rows


def _ordered(keys, order: list[str]) -> list[str]:
    keys = list(dict.fromkeys(keys))
    return [k for k in order if k in keys] + [k for k in keys if k not in order]


def model_name(key: str) -> str:
    return MODEL_NAMES.get(key, key)


def _img(png: bytes, alt: str) -> dict:
    return {"src": "data:image/png;base64," + base64.b64encode(png).decode("ascii"), "alt": alt,
            "width": plots.display_width(png)}


# ---------------------------------------------------------------- report access


def _models(report: Mapping) -> dict[str, dict]:
    models = report.get("models") or {}
    return {k: models[k] or {} for k in _ordered(models.keys(), MODEL_ORDER)}


def _settings(report: Mapping) -> list[str]:
    found = list((report.get("evaluation") or {}).get("settings") or [])
    for m in _models(report).values():
        found += list((m.get("attacks") or {}).keys()) + list((m.get("worst_case") or {}).keys())
    found += list((report.get("average_rank") or {}).keys())
    return _ordered(found, SETTING_ORDER)


def _cell(model: Mapping, setting: str, attack: str) -> dict:
    return ((model.get("attacks") or {}).get(setting) or {}).get(attack) or {}


def _worst(model: Mapping, setting: str) -> dict:
    return (model.get("worst_case") or {}).get(setting) or {}


def _rank(report: Mapping, setting: str) -> dict:
    return (report.get("average_rank") or {}).get(setting) or {}


# ---------------------------------------------------------------- sections


def _param_text(attack: str, p: Mapping) -> str:
    """The key parameters of an attack in words."""
    p = dict(p or {})
    norm = {"Linf": "L∞", "linf": "L∞", "L2": "L2", "l2": "L2"}.get(str(p.get("norm")), p.get("norm"))
    bits: list[str] = []
    if attack in ("fgsm", "pgd", "autoattack"):
        if attack == "autoattack" and p.get("version"):
            bits.append(str(p["version"]))
        if "eps" in p:
            bits.append(f"ε {fmt(p['eps'])}" + (f" ({norm})" if norm else ""))
        if attack == "pgd":
            if "pgd_steps" in p:
                bits.append(f"{fmt(p['pgd_steps'])} steps" + (f" of {fmt(p['pgd_step_size'])}" if p.get("pgd_step_size") is not None else ""))
            if p.get("pgd_random_start"):
                bits.append("random start")
    elif attack == "cw":
        if "targeted" in p:
            bits.append(("targeted" + (f" ({p['targets']} targets)" if p.get("targets") else "")) if p["targeted"] else "untargeted")
        if "binary_search_steps" in p or "max_iter" in p:
            bs, it = p.get("binary_search_steps"), p.get("max_iter")
            bits.append(f"{fmt(bs)} binary-search step{'' if bs == 1 else 's'} × {fmt(it)} iteration{'' if it == 1 else 's'}")
        if "confidence" in p:
            bits.append(f"κ {fmt(p['confidence'])}")
    elif attack == "jsma":
        if "theta" in p:
            bits.append(f"θ {fmt(p['theta'])}")
        if "gamma" in p:
            bits.append(f"γ {fmt(p['gamma'])}")
        if p.get("targets"):
            bits.append(f"{p['targets']} targets")
    elif attack == "ladder":
        if "eps" in p:
            eps = p["eps"] if isinstance(p["eps"], (list, tuple)) else [p["eps"]]
            bits.append("ε " + ", ".join(f"{_num(e):.3g}" if _num(e) is not None else "n/a" for e in eps))
        if p.get("crafted_on"):
            bits.append(f"crafted on {model_name(str(p['crafted_on']))}")
    else:
        bits += [f"{k.replace('_', ' ')} {fmt(v)}" for k, v in p.items() if k not in ("max_samples", "batch_size")]
    return ", ".join(bits)


def _n_text(ns: list[int]) -> str:
    ns = sorted({n for n in ns if isinstance(n, int)})
    if not ns:
        return ""
    return f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"


def _table(report: Mapping, setting: str, number: int) -> dict:
    """One Table-2-like table: rows = models, columns = clean, attacks, worst case, average rank."""
    models = _models(report)
    evaluation = report.get("evaluation") or {}
    attacks = _ordered([a for m in models.values() for a in ((m.get("attacks") or {}).get(setting) or {})], ATTACK_ORDER)
    has_worst = any(_worst(m, setting) for m in models.values())
    ranks = _rank(report, setting)
    columns = [{"key": "clean", "label": "Clean", "kind": "acc"}]
    columns += [{"key": a, "label": ATTACK_NAMES.get(a, a), "kind": "acc"} for a in attacks]
    if has_worst:
        columns.append({"key": "worst", "label": "Worst case", "kind": "acc"})
    if ranks:
        columns.append({"key": "rank", "label": "Avg. rank", "kind": "rank"})

    values: dict[str, dict[str, float | None]] = {}
    dashes: dict[str, set[str]] = {}
    for name, m in models.items():
        row: dict[str, float | None] = {"clean": _num(m.get("clean_accuracy"))}
        for a in attacks:
            row[a] = _num(_cell(m, setting, a).get("accuracy"))
        row["worst"] = _num(_worst(m, setting).get("accuracy"))
        row["rank"] = _num(ranks.get(name))
        values[name] = row
        dashes[name] = {m.get("trained_on")} if m.get("trained_on") in attacks else set()

    best: dict[str, float] = {}
    for col in columns:
        key = col["key"]
        if col["kind"] == "acc":
            vals = [round(100 * values[n][key], 2) for n in models if values[n][key] is not None and key not in dashes[n]]
            if vals:
                best[key] = max(vals)
        else:
            vals = [round(values[n][key], 2) for n in models if values[n][key] is not None]
            if vals:
                best[key] = min(vals)

    rows = []
    for name in models:
        cells = []
        for col in columns:
            key, v = col["key"], values[name][col["key"]]
            if key in dashes[name]:
                cells.append({"text": DASH, "bold": False, "title": f"{model_name(name)} was trained on {col['label']}"})
                continue
            if col["kind"] == "acc":
                text = pct(v)
                bold = v is not None and round(100 * v, 2) == best.get(key)
            else:
                text = "n/a" if v is None else f"{v:.2f}"
                bold = v is not None and round(v, 2) == best.get(key)
            cells.append({"text": text, "bold": bold, "title": ""})
        rows.append({"key": name, "name": model_name(name), "cells": cells,
                     "highlight": name in ("ladder", "trades_ladder")})

    params = evaluation.get("params") or {}
    notes = []
    for a in attacks:
        p = params.get(a)
        if p is None:  # fall back to the parameters stored with the cells
            p = next((_cell(m, setting, a).get("params") for m in models.values() if _cell(m, setting, a).get("params")), {})
        ns = [_cell(m, setting, a).get("n") for m in models.values()]
        text = ", ".join(t for t in (_param_text(a, p), _n_text(ns)) if t)
        notes.append(f"{ATTACK_NAMES.get(a, a)}: {text}" if text else ATTACK_NAMES.get(a, a))
    if has_worst:
        ns = [_worst(m, setting).get("n") for m in models.values()]
        covered = _ordered([a for m in models.values() for a in (_worst(m, setting).get("attacks") or [])], ATTACK_ORDER)
        what = ", ".join(ATTACK_NAMES.get(a, a) for a in covered) or "every attack"
        notes.append(f"Worst case: correct clean and under {what}, per sample, {_n_text(ns)}".rstrip(", "))
    if ranks:
        notes.append("Average rank over the clean and attack columns (lower is better)")

    surrogate = report.get("surrogate") or {}
    if setting == "blackbox":
        how = "attacks crafted on a surrogate model"
        if surrogate.get("architecture"):
            how += f" ({surrogate['architecture']}, clean {pct(surrogate.get('clean_accuracy'), PCT)})"
        how += " and transferred to every model"
    elif setting == "whitebox":
        how = "attacks crafted on each model itself"
    else:
        how = ""
    caption = f"Table {number}. {SETTING_NAMES.get(setting, setting)} accuracy (%)" + (f": {how}." if how else ".")
    caption += f" Bold: best per column; {DASH}: the attack the model was trained on."
    return {"setting": setting, "title": SETTING_NAMES.get(setting, setting), "caption": caption, "columns": columns,
            "rows": rows, "notes": notes, "by_group": _by_group(models, setting)}


def _by_group(models: Mapping[str, Mapping], setting: str) -> dict | None:
    """Accuracy under the LADDER attack per ε, when the cells carry a `by_group` breakdown."""
    values, rows = None, []
    for name, m in models.items():
        g = _cell(m, setting, "ladder").get("by_group") or {}
        if g.get("values") and g.get("accuracy"):
            values = values or list(g["values"])
            rows.append({"name": model_name(name), "cells": [pct(a) for a in g["accuracy"]]})
    if not rows:
        return None
    return {"headers": [f"ε {_num(v):.3g}" if _num(v) is not None else fmt(v) for v in values], "rows": rows}


def _verdict(report: Mapping, settings: list[str]) -> tuple[list[str], list[str]]:
    """(sentences, warnings) computed from the numbers."""
    models = _models(report)
    sentences: list[str] = []
    ladder = models.get("ladder")
    refs = [(k, models[k]) for k in ("vanilla", "control") if k in models]
    if ladder is None:
        sentences.append("This report has no LADDER model; the tables compare the models it has.")
    else:
        lc = _num(ladder.get("clean_accuracy"))
        if lc is None:
            sentences.append("LADDER's clean accuracy is not available.")
        else:
            parts = []
            for k, m in refs:
                c = _num(m.get("clean_accuracy"))
                if c is not None:
                    parts.append(f"{points(lc - c)} points vs {k} ({pct(c, PCT)})")
            sentences.append(f"LADDER's clean accuracy is {pct(lc, PCT)}" + (": " + " and ".join(parts) if parts else "") + ".")
        for s in settings:
            w = _num(_worst(ladder, s).get("accuracy"))
            if w is None:
                continue
            parts = []
            for k, m in refs:
                r = _num(_worst(m, s).get("accuracy"))
                if r is not None:
                    parts.append(f"{points(w - r)} points over {k} ({pct(r, PCT)})")
            sentences.append(f"{SETTING_NAMES.get(s, s)} worst-case robust accuracy of LADDER is {pct(w, PCT)}"
                             + (": " + " and ".join(parts) if parts else "") + ".")
    ranked = []
    for s in settings:
        r = {k: _num(v) for k, v in _rank(report, s).items() if _num(v) is not None}
        if r:
            low = min(r.values())
            best = [model_name(k) for k in _ordered(r, MODEL_ORDER) if round(r[k], 6) == round(low, 6)]
            names = best[0] if len(best) == 1 else ", ".join(best[:-1]) + " and " + best[-1]
            ranked.append(f"{SETTING_NAMES.get(s, s).lower()}: {names} ({low:.2f})")
    if ranked:
        sentences.append("Best average rank (lower is better) — " + "; ".join(ranked) + ".")
    if not models:
        sentences.append("The report holds no evaluated models.")

    warnings: list[str] = []
    evaluation = report.get("evaluation") or {}
    aa = evaluation.get("autoattack") or {}
    aa_warn = list(aa.get("warnings") or [])
    other = [w for w in (evaluation.get("warnings") or []) if w not in aa_warn]
    if aa_warn:
        warnings.append(f"AutoAttack raised {len(aa_warn)} warning{'s' if len(aa_warn) != 1 else ''}: "
                        + "; ".join(str(w) for w in aa_warn))
    if other:
        warnings.append(f"The attacks raised {len(other)} warning{'s' if len(other) != 1 else ''}: "
                        + "; ".join(str(w) for w in other))
    gen = report.get("generator") or {}
    ra = _num(gen.get("reconstruction_accuracy", gen.get("recon_accuracy")))
    ca = _num(gen.get("clean_accuracy"))
    if ra is not None and ca is not None and ra < ca - FIDELITY_GAP:
        warnings.append(f"Poor generator fidelity: the classifier's accuracy on reconstructions is {pct(ra, PCT)}, "
                        f"{points(ca - ra).lstrip('+')} points under its clean accuracy ({pct(ca, PCT)}); "
                        "LADDER examples may not look like the data.")
    return sentences, warnings


def _colors(keys: list[str]) -> dict[str, str]:
    """A colour per model, by display name: the model's own in MODEL_ORDER, the next free ones for the others."""
    return {model_name(k): plots.PALETTE[MODEL_ORDER.index(k) % len(plots.PALETTE)] if k in MODEL_ORDER
            else plots.PALETTE[(len(MODEL_ORDER) + i) % len(plots.PALETTE)] for i, k in enumerate(keys)}


def _tradeoff(report: Mapping, settings: list[str]) -> dict | None:
    models = _models(report)
    pts = []
    for s in settings:
        for k, m in models.items():
            c, w = _num(m.get("clean_accuracy")), _num(_worst(m, s).get("accuracy"))
            if c is not None and w is not None:
                pts.append((model_name(k), s, 100 * c, 100 * w))
    if not pts:
        return None
    return _img(plots.tradeoff(pts, _colors(list(models))), "Clean accuracy against worst-case robust accuracy per model and setting")


def _calibration(report: Mapping) -> dict | None:
    cal = report.get("calibration") or {}
    if not cal:
        return None
    table = list(cal.get("table") or [])
    variants = cal.get("variant_crossing_rate") or {}
    curve = cal.get("curve") or {}
    chosen = []
    for row in table:
        e = _num(row.get("eps"))
        q = _num(row.get("quantile"))
        chosen.append((e, _num(row.get("crossing_rate")), f"q {q:g}" if q is not None else (f"ε {e:.3g}" if e is not None else "")))
    vpts = {model_name(k): [(_num(r.get("eps")), _num(v)) for r, v in zip(table, vals or [])] for k, vals in variants.items()}
    image = None
    if curve.get("eps") or chosen:
        png = plots.crossing_curve([_num(e) for e in curve.get("eps") or []],
                                   [_num(r) for r in curve.get("crossing_rate") or []], chosen, vpts)
        image = _img(png, "Share of latents crossing the boundary against ε, chosen ε marked")
    vnames = list(variants)
    rows = []
    for i, row in enumerate(table):
        rows.append({"cells": [fmt(row.get("quantile")) if row.get("quantile") is not None else "–",
                               fmt(_num(row.get("eps"))), pct(row.get("crossing_rate")), pct(row.get("image_flip_rate"))]
                     + [pct((variants[v] or [None] * len(table))[i] if i < len(variants[v] or []) else None) for v in vnames]})
    headers = ["quantile", "ε", "crossing rate along the normal (%)", "image flip rate (%)"] + [f"{model_name(v)} crossing (%)" for v in vnames]
    mode = cal.get("mode")
    how = {"quantiles": "ε chosen at quantiles of the latents' distance to the boundary",
           "raw": "ε given by the user"}.get(mode, f"mode {mode}" if mode else "")
    return {"image": image, "headers": headers, "rows": rows, "mode": how,
            "examples": _count(cal["examples"]) if cal.get("examples") is not None else None}


def _gallery(report: Mapping, gallery: Mapping | None) -> dict | None:
    if not gallery or not gallery.get("pairs"):
        return None
    eps = [_num(e) for e in gallery.get("eps") or []]
    cal = report.get("calibration") or {}
    table = cal.get("table") or []
    curve = cal.get("curve") or {}
    titles = ["original", "reconstruction"]
    for e in eps:
        if e is None:
            titles.append("ε n/a")
            continue
        rate = next((_num(r.get("crossing_rate")) for r in table
                     if _num(r.get("eps")) is not None and math.isclose(_num(r.get("eps")), e, rel_tol=1e-6, abs_tol=1e-12)), None)
        approx = ""
        if rate is None and curve.get("eps"):  # not a calibrated ε: read the curve
            pts = [(a, b) for a, b in zip(curve["eps"], curve.get("crossing_rate") or []) if _num(a) and _num(b) is not None]
            if pts and pts[0][0] <= e <= pts[-1][0]:
                xs = [math.log(a) for a, _ in pts]
                rate, approx = float(np.interp(math.log(e), xs, [b for _, b in pts])), "≈"
        titles.append(f"ε = {e:.3g}" + (f"\ncrossing {approx}{100 * rate:.0f} %" if rate is not None else ""))
    rows = []
    for p in gallery["pairs"]:
        label = f"{p.get('source', '?')} → {p.get('target', '?')}"
        rows.append((label, p["images"]))
    png = plots.gallery(rows, titles)
    return {"image": _img(png, "Generated LADDER examples: original, reconstruction and one image per ε for each source → target pair"),
            "pairs": len(rows)}


def _timeline(report: Mapping) -> dict | None:
    stage_seconds = report.get("stage_seconds") or {}
    stages = [(k, _num(stage_seconds[k]) or 0.0) for k in _ordered(stage_seconds, STAGE_ORDER)]
    if not stages:
        return None
    ft = ((report.get("finetune") or {}).get("seconds") or {})
    ft_rows = [(model_name(k), _num(ft[k]) or 0.0) for k in _ordered(ft, MODEL_ORDER)]
    png = plots.timeline(stages, ft_rows)
    total = sum(s for _, s in stages)
    ev_seconds = (report.get("evaluation") or {}).get("seconds") or {}
    return {"image": _img(png, "Timeline of stage times"), "total": seconds(total),
            "rows": [(k, seconds(s), f"{100 * s / total:.1f} %" if total > 0 else "n/a") for k, s in stages],
            "attack_seconds": [(ATTACK_NAMES.get(k, k), seconds(ev_seconds[k])) for k in _ordered(ev_seconds, ATTACK_ORDER)]}


def _finetune(report: Mapping) -> list[dict]:
    ft = report.get("finetune") or {}
    loss, secs = ft.get("loss") or {}, ft.get("seconds") or {}
    out = []
    for k in _ordered(list(loss) + list(secs), MODEL_ORDER):
        hist = [_num(v) for v in (loss.get(k) or [])]
        hist = [v for v in hist if v is not None]
        out.append({"name": model_name(k), "epochs": len(loss.get(k) or []) or "n/a",
                    "first": f"{hist[0]:.4f}" if hist else "n/a", "last": f"{hist[-1]:.4f}" if hist else "n/a",
                    "seconds": seconds(secs.get(k)) if k in secs else "n/a"})
    return out


OBJECTIVE_TEXT = {"rank": "average rank (over clean accuracy and transfer FGSM, PGD and AutoAttack, among the "
                          "model's checkpoints; lower is better)"}


def _objective(value: float | None, objective: str | None) -> str:
    """A checkpoint's objective: a percentage, or for the rank objective an average rank."""
    return "n/a" if value is None else (f"{value:.2f}" if objective == "rank" else pct(value))


def _selection(report: Mapping) -> dict | None:
    sel = report.get("selection")
    if not sel:
        return None
    models = sel.get("models") or {}
    order = _ordered(list(models), MODEL_ORDER)
    colors = _colors(order)
    curves = {model_name(k): [(c["epoch"], c["clean_drop_points"], c["objective"]) for c in models[k]["curve"]]
              for k in order}
    chosen = {model_name(k): models[k]["chosen_epoch"] for k in order}
    on_test = sel.get("on_test") or {}
    rows = [{"name": model_name(k), "epoch": "uploaded weights" if models[k]["uploaded_weights"] else models[k]["chosen_epoch"],
             "why": models[k]["why"], "val_clean": pct(models[k]["validation"]["clean"]),
             "val_objective": _objective(models[k]["validation"]["objective"], sel.get("objective")),
             "test_drop": points(-on_test[k]["clean_drop_points"] / 100) if k in on_test else "n/a",
             "held": "yes" if (on_test.get(k) or {}).get("within_budget") else "no"} for k in order]
    val = sel.get("validation") or {}
    objective = str(sel.get("objective", ""))
    return {"budget": fmt(sel.get("max_clean_drop_points")),
            "objective": OBJECTIVE_TEXT.get(objective, objective.replace("_", " ")),
            "n": _count(val.get("n")), "robust_n": _count(val.get("robust_points")), "rows": rows,
            "uploaded": val.get("source") == "uploaded",
            "fraction": "n/a" if val.get("fraction") is None else f"{100 * val['fraction']:g} %",
            "held": bool(sel.get("budget_held_on_test")),
            "plot": _img(plots.selection_curve(curves, chosen, float(sel.get("max_clean_drop_points") or 0),
                                               objective, colors),
                         "Validation clean drop and objective per checkpoint, per model")}


def _autoattack(evaluation: Mapping) -> dict | None:
    aa = evaluation.get("autoattack") or {}
    if not aa:
        return None
    rows = [(k, fmt(aa[k])) for k in ("package", "version", "mode") if k in aa]
    rows.append(("attacks", fmt(aa.get("attacks") or []) or "n/a"))
    setting = _param_text("autoattack", (evaluation.get("params") or {}).get("autoattack") or {})
    if setting:
        rows.append(("setting", setting))
    rows += [(k.replace("_", " "), fmt(v)) for k, v in aa.items() if k not in ("package", "version", "mode", "attacks", "warnings")]
    warnings = [str(w) for w in aa.get("warnings") or []]
    rows.append(("warnings", str(len(warnings))))
    return {"rows": rows, "warnings": warnings}


def _subtitle(report: Mapping) -> str:
    spec, evaluation = report.get("spec") or {}, report.get("evaluation") or {}
    n = evaluation.get("n") or (report.get("data") or {}).get("evaluated")
    parts = [fmt(spec.get("architecture")) if spec.get("architecture") is not None else "",
             f"{fmt(spec['num_classes'])} classes" if spec.get("num_classes") is not None else "",
             f"{_count(n)} test images evaluated" if n else ""]
    return " · ".join(p for p in parts if p)


def _identity(report: Mapping) -> list[tuple[str, str]]:
    spec, data, latent = report.get("spec") or {}, report.get("data") or {}, report.get("latent") or {}
    rows = [("Architecture", fmt(spec.get("architecture"))), ("Classes", fmt(spec.get("num_classes")))]
    if spec.get("input_shape"):
        rows.append(("Input shape (C×H×W)", "×".join(fmt(v) for v in spec["input_shape"])))
    if spec.get("mean") is not None or spec.get("std") is not None:
        rows.append(("Normalisation", f"mean {fmt(spec.get('mean'))}; std {fmt(spec.get('std'))}"))
    if latent:
        rows.append(("Latent layer", f"{fmt(latent.get('layer'))} ({fmt(latent.get('dim'))}-d)"))
    for k, label in (("train", "Training images"), ("test", "Test images"), ("evaluated", "Evaluated images")):
        if k in data:
            rows.append((label, _count(data[k])))
    return rows


def render_html(report: dict, gallery: dict | None = None) -> str:
    """The evaluation report `report` (schema ladder.report/2) as one self-contained HTML page.

    `gallery` (optional): {"eps": [ε...], "pairs": [{"source": s, "target": t, "images": (2 + len(eps), C, H, W)
    array or tensor in [0, 1]: original, reconstruction, one per ε}, ...]}.
    """
    settings = _settings(report)
    sentences, warnings = _verdict(report, settings)
    tables = [_table(report, s, i + 1) for i, s in enumerate(settings)]
    evaluation = report.get("evaluation") or {}
    gen = report.get("generator") or {}
    boundary = report.get("boundary") or {}
    context = {
        "title": "LADDER evaluation report",
        "subtitle": _subtitle(report),
        "schema": report.get("schema"),
        "identity": _identity(report),
        "sentences": sentences,
        "warnings": warnings,
        "tables": tables,
        "tradeoff": _tradeoff(report, settings),
        "gallery": _gallery(report, gallery),
        "calibration": _calibration(report),
        "timeline": _timeline(report),
        "finetune": _finetune(report),
        "selection": _selection(report),
        "generator": _kv(gen, {"reconstruction_mse": "reconstruction MSE", "recon_mse": "reconstruction MSE",
                               "reconstruction_accuracy": "accuracy on reconstructions",
                               "recon_accuracy": "accuracy on reconstructions", "clean_accuracy": "accuracy on originals",
                               "mean_image_mse": "MSE of the mean image", "n": "held-out images"}),
        "boundary": _kv(boundary, {"pairs": "class pairs (SVMs)", "train_accuracy_mean": "train accuracy (mean)",
                                   "holdout_accuracy_mean": "hold-out accuracy (mean)",
                                   "holdout_accuracy_min": "hold-out accuracy (min)"}),
        "surrogate": _kv(report.get("surrogate")),
        "autoattack": _autoattack(evaluation),
        "seeds": _kv(report.get("seeds")),
        "versions": [(k, fmt(v)) for k, v in (report.get("versions") or {}).items()],
        "config": json.dumps(report.get("config") or {}, indent=2, ensure_ascii=False, default=str),
    }
    return _env.get_template("report.html.j2").render(**context)
