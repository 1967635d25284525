"""The report page's accuracy tables (the paper's Table 2 layout, one per setting) and its summary verdict."""

from __future__ import annotations

from collections.abc import Mapping

from services.report.format import (
    ATTACK_NAMES,
    ATTACK_ORDER,
    DASH,
    FIDELITY_GAP,
    MODEL_ORDER,
    PCT,
    SETTING_NAMES,
    SETTING_ORDER,
    fmt,
    model_name,
    num,
    ordered,
    pct,
    points,
)


def report_models(report: Mapping) -> dict[str, dict]:
    models = report.get("models") or {}
    return {k: models[k] or {} for k in ordered(models.keys(), MODEL_ORDER)}


def report_settings(report: Mapping) -> list[str]:
    found = list((report.get("evaluation") or {}).get("settings") or [])
    for m in report_models(report).values():
        found += list((m.get("attacks") or {}).keys()) + list((m.get("worst_case") or {}).keys())
    found += list((report.get("average_rank") or {}).keys())
    return ordered(found, SETTING_ORDER)


def cell(model: Mapping, setting: str, attack: str) -> dict:
    return ((model.get("attacks") or {}).get(setting) or {}).get(attack) or {}


def worst_cell(model: Mapping, setting: str) -> dict:
    return (model.get("worst_case") or {}).get(setting) or {}


def rank_cell(report: Mapping, setting: str) -> dict:
    return (report.get("average_rank") or {}).get(setting) or {}


# ---------------------------------------------------------------- sections


def param_text(attack: str, p: Mapping) -> str:
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
                of = f" of {fmt(p['pgd_step_size'])}" if p.get("pgd_step_size") is not None else ""
                bits.append(f"{fmt(p['pgd_steps'])} steps" + of)
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
            bits.append("ε " + ", ".join(f"{num(e):.3g}" if num(e) is not None else "n/a" for e in eps))
        if p.get("crafted_on"):
            bits.append(f"crafted on {model_name(str(p['crafted_on']))}")
    else:
        bits += [f"{k.replace('_', ' ')} {fmt(v)}" for k, v in p.items() if k not in ("max_samples", "batch_size")]
    return ", ".join(bits)


def n_text(ns: list[int]) -> str:
    ns = sorted({n for n in ns if isinstance(n, int)})
    if not ns:
        return ""
    return f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"


def accuracy_table(report: Mapping, setting: str, number: int) -> dict:
    """One Table-2-like table: rows = models, columns = clean, attacks, worst case, average rank."""
    models = report_models(report)
    evaluation = report.get("evaluation") or {}
    attacks = ordered([a for m in models.values() for a in ((m.get("attacks") or {}).get(setting) or {})], ATTACK_ORDER)
    has_worst = any(worst_cell(m, setting) for m in models.values())
    ranks = rank_cell(report, setting)
    columns = [{"key": "clean", "label": "Clean", "kind": "acc"}]
    columns += [{"key": a, "label": ATTACK_NAMES.get(a, a), "kind": "acc"} for a in attacks]
    if has_worst:
        columns.append({"key": "worst", "label": "Worst case", "kind": "acc"})
    if ranks:
        columns.append({"key": "rank", "label": "Avg. rank", "kind": "rank"})

    values: dict[str, dict[str, float | None]] = {}
    dashes: dict[str, set[str]] = {}
    for name, m in models.items():
        row: dict[str, float | None] = {"clean": num(m.get("clean_accuracy"))}
        for a in attacks:
            row[a] = num(cell(m, setting, a).get("accuracy"))
        row["worst"] = num(worst_cell(m, setting).get("accuracy"))
        row["rank"] = num(ranks.get(name))
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
            p = next((cell(m, setting, a).get("params") for m in models.values() if cell(m, setting, a).get("params")), {})
        ns = [cell(m, setting, a).get("n") for m in models.values()]
        text = ", ".join(t for t in (param_text(a, p), n_text(ns)) if t)
        notes.append(f"{ATTACK_NAMES.get(a, a)}: {text}" if text else ATTACK_NAMES.get(a, a))
    if has_worst:
        ns = [worst_cell(m, setting).get("n") for m in models.values()]
        covered = ordered([a for m in models.values() for a in (worst_cell(m, setting).get("attacks") or [])], ATTACK_ORDER)
        what = ", ".join(ATTACK_NAMES.get(a, a) for a in covered) or "every attack"
        notes.append(f"Worst case: correct clean and under {what}, per sample, {n_text(ns)}".rstrip(", "))
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
            "rows": rows, "notes": notes, "by_group": by_group(models, setting)}


def by_group(models: Mapping[str, Mapping], setting: str) -> dict | None:
    """Accuracy under the LADDER attack per ε, when the cells carry a `by_group` breakdown."""
    values, rows = None, []
    for name, m in models.items():
        g = cell(m, setting, "ladder").get("by_group") or {}
        if g.get("values") and g.get("accuracy"):
            values = values or list(g["values"])
            rows.append({"name": model_name(name), "cells": [pct(a) for a in g["accuracy"]]})
    if not rows:
        return None
    return {"headers": [f"ε {num(v):.3g}" if num(v) is not None else fmt(v) for v in values], "rows": rows}


def verdict(report: Mapping, settings: list[str]) -> tuple[list[str], list[str]]:
    """(sentences, warnings) computed from the numbers."""
    models = report_models(report)
    sentences: list[str] = []
    ladder = models.get("ladder")
    refs = [(k, models[k]) for k in ("vanilla", "control") if k in models]
    if ladder is None:
        sentences.append("This report has no LADDER model; the tables compare the models it has.")
    else:
        lc = num(ladder.get("clean_accuracy"))
        if lc is None:
            sentences.append("LADDER's clean accuracy is not available.")
        else:
            parts = []
            for k, m in refs:
                c = num(m.get("clean_accuracy"))
                if c is not None:
                    parts.append(f"{points(lc - c)} points vs {k} ({pct(c, PCT)})")
            sentences.append(f"LADDER's clean accuracy is {pct(lc, PCT)}" + (": " + " and ".join(parts) if parts else "") + ".")
        for s in settings:
            w = num(worst_cell(ladder, s).get("accuracy"))
            if w is None:
                continue
            parts = []
            for k, m in refs:
                r = num(worst_cell(m, s).get("accuracy"))
                if r is not None:
                    parts.append(f"{points(w - r)} points over {k} ({pct(r, PCT)})")
            sentences.append(f"{SETTING_NAMES.get(s, s)} worst-case robust accuracy of LADDER is {pct(w, PCT)}"
                             + (": " + " and ".join(parts) if parts else "") + ".")
    ranked = []
    for s in settings:
        r = {k: num(v) for k, v in rank_cell(report, s).items() if num(v) is not None}
        if r:
            low = min(r.values())
            best = [model_name(k) for k in ordered(r, MODEL_ORDER) if round(r[k], 6) == round(low, 6)]
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
    ra = num(gen.get("reconstruction_accuracy", gen.get("recon_accuracy")))
    ca = num(gen.get("clean_accuracy"))
    if ra is not None and ca is not None and ra < ca - FIDELITY_GAP:
        warnings.append(f"Poor generator fidelity: the classifier's accuracy on reconstructions is {pct(ra, PCT)}, "
                        f"{points(ca - ra).lstrip('+')} points under its clean accuracy ({pct(ca, PCT)}); "
                        "LADDER examples may not look like the data.")
    return sentences, warnings
