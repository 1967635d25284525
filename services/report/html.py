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

import json
import math
from collections.abc import Mapping

import jinja2
import numpy as np

from services.method.stages import JOB_STAGES
from services.report import plots
from services.report.format import (
    ATTACK_NAMES,
    ATTACK_ORDER,
    MODEL_ORDER,
    count,
    fmt,
    img,
    kv,
    model_name,
    num,
    ordered,
    pct,
    points,
    seconds,
)
from services.report.tables import accuracy_table, param_text, report_models, report_settings, verdict, worst_cell

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("services.report", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


def _colors(keys: list[str]) -> dict[str, str]:
    """A colour per model, by display name: the model's own in MODEL_ORDER, the next free ones for the others."""
    return {model_name(k): plots.PALETTE[MODEL_ORDER.index(k) % len(plots.PALETTE)] if k in MODEL_ORDER
            else plots.PALETTE[(len(MODEL_ORDER) + i) % len(plots.PALETTE)] for i, k in enumerate(keys)}


def _tradeoff(report: Mapping, settings: list[str]) -> dict | None:
    models = report_models(report)
    pts = []
    for s in settings:
        for k, m in models.items():
            c, w = num(m.get("clean_accuracy")), num(worst_cell(m, s).get("accuracy"))
            if c is not None and w is not None:
                pts.append((model_name(k), s, 100 * c, 100 * w))
    if not pts:
        return None
    return img(plots.tradeoff(pts, _colors(list(models))), "Clean accuracy against worst-case robust accuracy per model and setting")


def _calibration(report: Mapping) -> dict | None:
    cal = report.get("calibration") or {}
    if not cal:
        return None
    table = list(cal.get("table") or [])
    variants = cal.get("variant_crossing_rate") or {}
    curve = cal.get("curve") or {}
    chosen = []
    for row in table:
        e = num(row.get("eps"))
        q = num(row.get("quantile"))
        chosen.append((e, num(row.get("crossing_rate")), f"q {q:g}" if q is not None else (f"ε {e:.3g}" if e is not None else "")))
    vpts = {model_name(k): [(num(r.get("eps")), num(v)) for r, v in zip(table, vals or [])] for k, vals in variants.items()}
    image = None
    if curve.get("eps") or chosen:
        png = plots.crossing_curve([num(e) for e in curve.get("eps") or []],
                                   [num(r) for r in curve.get("crossing_rate") or []], chosen, vpts)
        image = img(png, "Share of latents crossing the boundary against ε, chosen ε marked")
    vnames = list(variants)
    rows = []
    for i, row in enumerate(table):
        rows.append({"cells": [fmt(row.get("quantile")) if row.get("quantile") is not None else "–",
                               fmt(num(row.get("eps"))), pct(row.get("crossing_rate")), pct(row.get("image_flip_rate"))]
                     + [pct((variants[v] or [None] * len(table))[i] if i < len(variants[v] or []) else None) for v in vnames]})
    headers = ["quantile", "ε", "crossing rate along the normal (%)", "image flip rate (%)",
               *(f"{model_name(v)} crossing (%)" for v in vnames)]
    mode = cal.get("mode")
    how = {"quantiles": "ε chosen at quantiles of the latents' distance to the boundary",
           "raw": "ε given by the user"}.get(mode, f"mode {mode}" if mode else "")
    return {"image": image, "headers": headers, "rows": rows, "mode": how,
            "examples": count(cal["examples"]) if cal.get("examples") is not None else None}


def _gallery(report: Mapping, gallery: Mapping | None) -> dict | None:
    if not gallery or not gallery.get("pairs"):
        return None
    eps = [num(e) for e in gallery.get("eps") or []]
    cal = report.get("calibration") or {}
    table = cal.get("table") or []
    curve = cal.get("curve") or {}
    titles = ["original", "reconstruction"]
    for e in eps:
        if e is None:
            titles.append("ε n/a")
            continue
        rate = next((num(r.get("crossing_rate")) for r in table
                     if num(r.get("eps")) is not None and math.isclose(num(r.get("eps")), e, rel_tol=1e-6, abs_tol=1e-12)), None)
        approx = ""
        if rate is None and curve.get("eps"):  # not a calibrated ε: read the curve
            pts = [(a, b) for a, b in zip(curve["eps"], curve.get("crossing_rate") or []) if num(a) and num(b) is not None]
            if pts and pts[0][0] <= e <= pts[-1][0]:
                xs = [math.log(a) for a, _ in pts]
                rate, approx = float(np.interp(math.log(e), xs, [b for _, b in pts])), "≈"
        titles.append(f"ε = {e:.3g}" + (f"\ncrossing {approx}{100 * rate:.0f} %" if rate is not None else ""))
    rows = []
    for p in gallery["pairs"]:
        label = f"{p.get('source', '?')} → {p.get('target', '?')}"
        rows.append((label, p["images"]))
    png = plots.gallery(rows, titles)
    return {"image": img(png, "Generated LADDER examples: original, reconstruction and one image per ε for each source → target pair"),
            "pairs": len(rows)}


def _timeline(report: Mapping) -> dict | None:
    stage_seconds = report.get("stage_seconds") or {}
    stages = [(k, num(stage_seconds[k]) or 0.0) for k in ordered(stage_seconds, list(JOB_STAGES))]
    if not stages:
        return None
    ft = ((report.get("finetune") or {}).get("seconds") or {})
    ft_rows = [(model_name(k), num(ft[k]) or 0.0) for k in ordered(ft, MODEL_ORDER)]
    png = plots.timeline(stages, ft_rows)
    total = sum(s for _, s in stages)
    ev_seconds = (report.get("evaluation") or {}).get("seconds") or {}
    return {"image": img(png, "Timeline of stage times"), "total": seconds(total),
            "rows": [(k, seconds(s), f"{100 * s / total:.1f} %" if total > 0 else "n/a") for k, s in stages],
            "attack_seconds": [(ATTACK_NAMES.get(k, k), seconds(ev_seconds[k])) for k in ordered(ev_seconds, ATTACK_ORDER)]}


def _finetune(report: Mapping) -> list[dict]:
    ft = report.get("finetune") or {}
    loss, secs = ft.get("loss") or {}, ft.get("seconds") or {}
    out = []
    for k in ordered(list(loss) + list(secs), MODEL_ORDER):
        hist = [num(v) for v in (loss.get(k) or [])]
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
    order = ordered(list(models), MODEL_ORDER)
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
            "n": count(val.get("n")), "robust_n": count(val.get("robust_points")), "rows": rows,
            "uploaded": val.get("source") == "uploaded",
            "fraction": "n/a" if val.get("fraction") is None else f"{100 * val['fraction']:g} %",
            "held": bool(sel.get("budget_held_on_test")),
            "plot": img(plots.selection_curve(curves, chosen, float(sel.get("max_clean_drop_points") or 0),
                                               objective, colors),
                         "Validation clean drop and objective per checkpoint, per model")}


def _autoattack(evaluation: Mapping) -> dict | None:
    aa = evaluation.get("autoattack") or {}
    if not aa:
        return None
    rows = [(k, fmt(aa[k])) for k in ("package", "version", "mode") if k in aa]
    rows.append(("attacks", fmt(aa.get("attacks") or []) or "n/a"))
    setting = param_text("autoattack", (evaluation.get("params") or {}).get("autoattack") or {})
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
             f"{count(n)} test images evaluated" if n else ""]
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
            rows.append((label, count(data[k])))
    return rows


def render_html(report: dict, gallery: dict | None = None) -> str:
    """The evaluation report `report` (schema ladder.report/2) as one self-contained HTML page.

    `gallery` (optional): {"eps": [ε...], "pairs": [{"source": s, "target": t, "images": (2 + len(eps), C, H, W)
    array or tensor in [0, 1]: original, reconstruction, one per ε}, ...]}.
    """
    settings = report_settings(report)
    sentences, warnings = verdict(report, settings)
    tables = [accuracy_table(report, s, i + 1) for i, s in enumerate(settings)]
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
        "generator": kv(gen, {"reconstruction_mse": "reconstruction MSE", "recon_mse": "reconstruction MSE",
                               "reconstruction_accuracy": "accuracy on reconstructions",
                               "recon_accuracy": "accuracy on reconstructions", "clean_accuracy": "accuracy on originals",
                               "mean_image_mse": "MSE of the mean image", "n": "held-out images"}),
        "boundary": kv(boundary, {"pairs": "class pairs (SVMs)", "train_accuracy_mean": "train accuracy (mean)",
                                   "holdout_accuracy_mean": "hold-out accuracy (mean)",
                                   "holdout_accuracy_min": "hold-out accuracy (min)"}),
        "surrogate": kv(report.get("surrogate")),
        "autoattack": _autoattack(evaluation),
        "seeds": kv(report.get("seeds")),
        "versions": [(k, fmt(v)) for k, v in (report.get("versions") or {}).items()],
        "config": json.dumps(report.get("config") or {}, indent=2, ensure_ascii=False, default=str),
    }
    return _env.get_template("report.html.j2").render(**context)
