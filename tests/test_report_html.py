"""The HTML evaluation report: content, self-containment, determinism, escaping, and a real browser render."""

import copy
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from services.method.rank import report_ranks
from services.report import render_html

CHROMIUM = os.environ.get("LADDER_CHROMIUM", "/usr/bin/chromium")  # scripts/services installs it
ATTACKS = ["fgsm", "pgd", "cw", "jsma", "autoattack", "ladder"]
EPS = [0.84, 1.63, 2.9, 4.71, 7.35]

# (clean, whitebox per attack, blackbox per attack, worst wb, worst bb), accuracies as fractions
NUMBERS = {
    "vanilla": (0.952, {"fgsm": 0.021, "pgd": 0.0, "cw": 0.004, "jsma": 0.11, "autoattack": 0.0, "ladder": 0.698},
                {"fgsm": 0.466, "pgd": 0.299, "cw": 0.909, "jsma": 0.939, "autoattack": 0.956}, 0.0, 0.21),
    "control": (0.957, {"fgsm": 0.034, "pgd": 0.0, "cw": 0.006, "jsma": 0.12, "autoattack": 0.0, "ladder": 0.731},
                {"fgsm": 0.481, "pgd": 0.311, "cw": 0.915, "jsma": 0.941, "autoattack": 0.958}, 0.0, 0.23),
    "fgsm_at": (0.923, {"fgsm": 0.702, "pgd": 0.381, "cw": 0.021, "jsma": 0.31, "autoattack": 0.29, "ladder": 0.801},
                {"fgsm": 0.812, "pgd": 0.809, "cw": 0.906, "jsma": 0.837, "autoattack": 0.922}, 0.02, 0.61),
    "pgd_at": (0.908, {"fgsm": 0.744, "pgd": 0.692, "cw": 0.052, "jsma": 0.42, "autoattack": 0.651, "ladder": 0.822},
               {"fgsm": 0.762, "pgd": 0.871, "cw": 0.907, "jsma": 0.833, "autoattack": 0.904}, 0.04, 0.66),
    "trades": (0.944, {"fgsm": 0.455, "pgd": 0.218, "cw": 0.015, "jsma": 0.25, "autoattack": 0.17, "ladder": 0.854},
               {"fgsm": 0.608, "pgd": 0.523, "cw": 0.94, "jsma": 0.926, "autoattack": 0.941}, 0.01, 0.45),
    "ladder": (0.955, {"fgsm": 0.121, "pgd": 0.004, "cw": 0.011, "jsma": 0.17, "autoattack": 0.001, "ladder": 0.982},
               {"fgsm": 0.558, "pgd": 0.492, "cw": 0.989, "jsma": 0.931, "autoattack": 0.954}, 0.0, 0.41),
    "trades_ladder": (0.949, {"fgsm": 0.431, "pgd": 0.21, "cw": 0.014, "jsma": 0.26, "autoattack": 0.15, "ladder": 0.97},
                      {"fgsm": 0.548, "pgd": 0.52, "cw": 0.978, "jsma": 0.934, "autoattack": None}, 0.01, 0.44),
    "ladder_random": (0.956, {"fgsm": 0.05, "pgd": 0.0, "cw": 0.007, "jsma": 0.12, "autoattack": 0.0, "ladder": 0.78},
                      {"fgsm": 0.49, "pgd": 0.33, "cw": 0.92, "jsma": 0.94, "autoattack": 0.957}, 0.0, 0.25),
}
TRAINED_ON = {"fgsm_at": "fgsm", "pgd_at": "pgd", "ladder": "ladder", "trades_ladder": "ladder"}


def attack_params() -> dict:
    return {
        "fgsm": {"eps": 0.3, "norm": "Linf"},
        "pgd": {"eps": 0.3, "pgd_steps": 40, "pgd_step_size": 0.01875, "pgd_random_start": True, "norm": "Linf"},
        "cw": {"targeted": True, "targets": "random", "binary_search_steps": 6, "max_iter": 100, "lr": 0.05,
               "initial_const": 0.1, "confidence": 0.0, "max_samples": 500},
        "jsma": {"theta": 1.0, "gamma": 0.1, "targets": "random", "max_samples": 100},
        "autoattack": {"version": "standard", "max_samples": 200, "batch_size": 250, "eps": 0.3, "norm": "Linf"},
        "ladder": {"eps": EPS, "crafted_on": "vanilla"},
    }


CAPS = {"cw": 500, "jsma": 100, "autoattack": 200}


def make_report(models=NUMBERS, settings=("whitebox", "blackbox"), attacks=ATTACKS, autoattack_warnings=True) -> dict:
    """A realistic ladder.report/2 document (numbers shaped like a 10-class LeNet run on 1,000 test digits)."""
    params = attack_params()
    out_models = {}
    for name, (clean, wb, bb, worst_wb, worst_bb) in models.items():
        cells = {}
        for s, table in (("whitebox", wb), ("blackbox", bb)):
            if s not in settings:
                continue
            cells[s] = {a: {"accuracy": table[a], "n": CAPS.get(a, 1000),
                            "params": {**params[a], **({"crafted_on": "surrogate"} if s == "blackbox" else {})}}
                        for a in attacks if a in table}
            if s == "whitebox" and "ladder" in cells[s]:
                cells[s]["ladder"]["by_group"] = {"values": EPS, "accuracy": [min(1, table["ladder"] + 0.02 * (2 - i)) for i in range(5)]}
        out_models[name] = {
            "clean_accuracy": clean, "trained_on": TRAINED_ON.get(name), "attacks": cells,
            "worst_case": {s: {"accuracy": w, "n": 100, "attacks": sorted(cells[s])}
                           for s, w in (("whitebox", worst_wb), ("blackbox", worst_bb)) if s in settings},
        }
    ranks = report_ranks(out_models, list(settings))  # the pipeline's own ranks (ties, trained-on cells)
    curve_eps = list(np.geomspace(0.05, 50, 64))
    curve_rate = [float(1 / (1 + np.exp(-2.2 * (np.log(e) - np.log(2.9))))) for e in curve_eps]
    report = {
        "schema": "ladder.report/2",
        "config": {"seed": 0, "latent_layer": None, "variants": ["ladder_random"],
                   "boundary": {"samples_per_class": 200, "holdout_per_class": 50, "attention_rank": 16, "l2": 0.001},
                   "generator": {"preset": "auto", "loss": "l2", "max_epochs": 15, "time_budget_s": 300.0},
                   "perturb": {"eps": None, "crossing_quantiles": [0.1, 0.25, 0.5, 0.75, 0.9], "calibration_samples": 2000},
                   "finetune": {"epochs": 10, "lr": 0.01, "momentum": 0.5, "batch_size": 64, "alpha": 0.5},
                   "evaluate": {"attacks": list(attacks), "settings": list(settings), "max_samples": 1000}},
        "seeds": {"run": 0, "latents": 1, "boundary": 2, "generator": 3, "adversarial": 4, "finetune": 5, "evaluate": 6},
        "versions": {"ladder": "0.1.0", "python": "3.11.7", "torch": "2.14.1", "torchvision": "0.29.1", "numpy": "2.4.6",
                     "art": "1.20.1", "autoattack": "0.2.0"},
        "spec": {"architecture": "lenet", "num_classes": 10, "input_shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081],
                 "latent_layer": None},
        "data": {"train": 4000, "test": 1000, "evaluated": 1000},
        "latent": {"layer": "fc1", "dim": 500},
        "stage_seconds": {"latents": 0.5, "boundary": 12.9, "generator": 30.5, "adversarial": 7.3, "finetune": 22.3,
                          "evaluate": 120.0, "report": 3.0},
        "boundary": {"pairs": 45, "train_accuracy_mean": 0.99, "holdout_accuracy_mean": 0.98, "holdout_accuracy_min": 0.9,
                     "newton_steps": 50, "attention_steps": 30, "seconds": 12.1},
        "generator": {"preset": "mnist", "epochs": 15, "stopped": "max_epochs", "reconstruction_mse": 0.0094,
                      "mean_image_mse": 0.068, "reconstruction_accuracy": 0.953, "clean_accuracy": 0.957, "n": 400},
        "calibration": {
            "mode": "quantiles",
            "table": [{"quantile": q, "eps": e, "crossing_rate": r, "image_flip_rate": f}
                      for q, e, r, f in zip([0.1, 0.25, 0.5, 0.75, 0.9], EPS, [0.1, 0.25, 0.5, 0.75, 0.9],
                                            [0.08, 0.19, 0.41, 0.66, 0.83])],
            "variant_crossing_rate": {"ladder_random": [0.01, 0.02, 0.05, 0.11, 0.2]},
            "curve": {"eps": [float(e) for e in curve_eps], "crossing_rate": curve_rate},
            "examples": 20000,
        },
        "finetune": {"loss": {m: [round(0.4 * 0.8 ** i + 0.05, 4) for i in range(10)] for m in models if m != "vanilla"},
                     "seconds": {m: round(2.0 + 0.4 * i, 1) for i, m in enumerate(m for m in models if m != "vanilla")}},
        "surrogate": {"architecture": "smallcnn", "clean_accuracy": 0.975, "epochs": 10},
        "evaluation": {
            "n": 1000, "settings": list(settings), "attacks": list(attacks),
            "params": {a: params[a] for a in attacks},
            "seconds": {a: 1.0 + 3 * i for i, a in enumerate(attacks)},
        },
        "models": out_models,
        "average_rank": ranks,
    }
    if "autoattack" in attacks:
        report["evaluation"]["autoattack"] = {
            "package": "pyautoattack", "version": "0.2.0", "mode": "standard", "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
            "warnings": ["it seems that the output is a probability distribution, please be sure that the logits are used!"]
            if autoattack_warnings else []}
    return report


def minimal_report() -> dict:
    """Only white-box, only FGSM and PGD, three models, no AutoAttack section, no calibration or stage times."""
    r = make_report({k: NUMBERS[k] for k in ("vanilla", "control", "ladder")}, settings=("whitebox",), attacks=("fgsm", "pgd"))
    for key in ("calibration", "stage_seconds", "finetune", "surrogate"):
        del r[key]
    return r


@pytest.fixture(scope="module")
def gallery() -> dict:
    """4 source → target pairs of real digits; the ε columns morph the source towards a target-class digit."""
    from services.datasets import mnist5k

    data = mnist5k()
    x = data.x.float() / 255 if data.x.dtype == torch.uint8 else data.x.float()
    y = data.y

    def blur(a: np.ndarray) -> np.ndarray:
        p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
        return (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] + 4 * a) / 8

    pairs = []
    for k, (s, t) in enumerate([(3, 8), (7, 1), (4, 9), (0, 6)]):
        src = x[(y == s).nonzero()[k, 0]].numpy()
        tgt = x[(y == t).nonzero()[k, 0]].numpy()
        recon = blur(src)
        steps = [blur((1 - w) * recon + w * tgt) for w in (0.1, 0.25, 0.45, 0.65, 0.85)]
        images = np.stack([src, recon, *steps]).astype(np.float32)
        pairs.append({"source": s, "target": t, "images": torch.from_numpy(images) if k == 0 else images})
    return {"eps": EPS, "pairs": pairs}


@pytest.fixture(scope="module")
def page(gallery) -> str:
    return render_html(make_report(), gallery)


def _tables(page: str) -> list[str]:
    return re.findall(r'<table class="results">.*?</table>', page, flags=re.DOTALL)


def _row(table: str, name: str) -> list[str]:
    row = re.search(rf"<tr[^>]*><td>{re.escape(name)}</td>(.*?)</tr>", table, flags=re.DOTALL).group(1)
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.DOTALL)]


def test_page_is_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    for ref in ("http://", "https://", 'src="/', "<script", "<link", "@import", "url("):
        assert ref not in page, ref
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) == 4  # trade-off, gallery, crossing rate, timeline
    for tag in imgs:
        assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', tag), tag[:80]


def test_sections_in_order(page):
    marks = ["<h1>", 'id="summary"', 'id="table-blackbox"', 'id="table-whitebox"', 'id="tradeoff"', 'id="examples"',
             'id="calibration"', 'id="timeline"', 'id="details"', "<details>"]
    positions = [page.index(m) for m in marks]
    assert positions == sorted(positions)
    assert "lenet" in page and "4,000" in page and "fc1 (500-d)" in page


def test_tables_like_table_2(page):
    blackbox, whitebox = _tables(page)
    header = re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", blackbox.split("</thead>")[0])
    assert header == ["Model", "Clean", "FGSM", "JSMA", "PGD", "CW-L2", "AutoAttack", "Worst case", "Avg. rank"]
    assert re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", whitebox.split("</thead>")[0])[7] == "LADDER"
    names = re.findall(r"<tr[^>]*><td>([^<]+)</td>", blackbox)
    assert names == ["Vanilla", "Control", "FGSM-AT", "PGD-AT", "TRADES", "LADDER", "TRADES+LADDER", "LADDER_Random"]
    assert _row(blackbox, "PGD-AT")[3] == "–"  # trained on PGD
    assert _row(blackbox, "FGSM-AT")[1] == "–"
    assert _row(whitebox, "LADDER")[6] == "–"  # trained on the LADDER attack
    assert _row(blackbox, "Vanilla")[:3] == ["95.20", "46.60", "93.90"]
    assert _row(blackbox, "TRADES+LADDER")[5] == "n/a"  # a null accuracy
    # best per column in bold: control's clean accuracy, PGD-AT's black-box worst case; the dash never counts
    assert "<strong>95.70</strong>" in blackbox and "<strong>66.00</strong>" in blackbox
    assert "<strong>87.10</strong>" not in blackbox  # PGD-AT under PGD is its own training attack
    assert "<strong>80.90</strong>" in blackbox  # so FGSM-AT has the best PGD column
    assert "PGD: ε 0.3 (L∞), 40 steps of 0.01875, random start, n = 1000" in page
    assert "JSMA: θ 1, γ 0.1, random targets, n = 100" in page


def test_verdict(page):
    summary = page[page.index('id="summary"'):page.index('id="tables"')]
    assert "LADDER&#39;s clean accuracy is 95.50\u00a0%: +0.30 points vs vanilla (95.20\u00a0%) and −0.20 points vs control" in summary
    assert "Black-box worst-case robust accuracy of LADDER is 41.00\u00a0%: +20.00 points over vanilla" in summary
    assert "+18.00 points over control" in summary
    assert "Best average rank (lower is better)" in summary
    assert summary.index("black-box") < summary.index("white-box")
    assert "AutoAttack raised 1 warning" in summary
    assert "Poor generator fidelity" not in summary
    poor = make_report()
    poor["generator"]["reconstruction_accuracy"] = 0.80
    poor["evaluation"]["autoattack"]["warnings"] = []
    text = render_html(poor)
    assert "Poor generator fidelity" in text and "AutoAttack raised" not in text


def test_deterministic(gallery):
    report = make_report()
    first = render_html(report, gallery)
    assert render_html(copy.deepcopy(report), gallery) == first


def test_escapes_user_strings():
    report = make_report()
    report["spec"]["architecture"] = "<script>alert(1)</script>"
    report["models"]["<script>x</script>$a$"] = copy.deepcopy(report["models"]["control"])
    page = render_html(report)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;script&gt;x&lt;/script&gt;$a$" in page


def test_minimal_report_renders():
    page = render_html(minimal_report())
    assert len(_tables(page)) == 1 and 'id="table-blackbox"' not in page
    header = re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", _tables(page)[0].split("</thead>")[0])
    assert header == ["Model", "Clean", "FGSM", "PGD", "Worst case", "Avg. rank"]
    assert "AutoAttack" not in page and 'id="examples"' not in page and 'id="timeline"' not in page
    assert len(re.findall(r"<img\b", page)) == 1  # the trade-off plot
    assert "White-box worst-case robust accuracy of LADDER" in page
    # a report with barely anything still renders
    bare = render_html({"schema": "ladder.report/2", "models": {"vanilla": {"clean_accuracy": None}}})
    assert "LADDER" in bare and "n/a" in bare


def test_rgb_gallery_with_uncalibrated_eps():
    """3-channel images as a torch tensor, ε values that are not in the calibration table (read off the curve)."""
    rng = np.random.default_rng(0)
    gallery = {"eps": [1.0, 3.0], "pairs": [{"source": 1, "target": 2, "images": torch.from_numpy(rng.random((4, 3, 32, 32)))}]}
    page = render_html(minimal_report() | {"calibration": make_report()["calibration"]}, gallery)
    assert len(re.findall(r"<img\b", page)) == 3 and 'id="examples"' in page


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def test_renders_in_chromium(page, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's `chromium` package (apt-get install chromium; "
                    "scripts/test installs it)")
    from playwright.sync_api import sync_playwright

    html = tmp_path / "report.html"
    html.write_text(page, encoding="utf-8")
    shot = tmp_path / "report.png"
    errors: list[str] = []
    started = time.perf_counter()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 900})
            tab.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            tab.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            tab.goto(html.as_uri(), wait_until="load")
            images = tab.evaluate("""() => Array.from(document.images).map(i => ({
                complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width}))""")
            overflow = tab.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
            tab.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert len(images) == 4
    for img in images:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
        assert 600 <= img["shown"] <= 900, img  # figures sized for reading
    assert overflow <= 0
    png = shot.read_bytes()
    width, height = _png_size(png)
    assert len(png) > 20_000 and height > 1500 and width >= 1000
    if os.environ.get("LADDER_SCREENSHOT_DIR"):
        target = Path(os.environ["LADDER_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / "report.png")
    assert time.perf_counter() - started < 60


def _selection(held: bool) -> dict:
    curve = lambda drops: [{"epoch": k, "clean": 0.99 - d / 100, "transfer_pgd": 0.3 + 0.05 * k, "objective": 0.3 + 0.05 * k,  # noqa: E731
                            "clean_drop_points": d, "within_budget": d <= 0.3} for k, d in enumerate(drops)]
    return {"max_clean_drop_points": 0.3, "objective": "transfer_pgd",
            "validation": {"n": 400, "robust_points": 200, "source": "carved", "fraction": 0.1}, "seconds": 4.0,
            "models": {"control": {"chosen_epoch": 0, "uploaded_weights": True, "why": "the uploaded weights: no epoch "
                                   "within the budget beat the uploaded model's objective", "validation": curve([0])[0],
                                   "curve": curve([0, 0.5, 0.6])},
                       "ladder": {"chosen_epoch": 2, "uploaded_weights": False, "why": "epoch 2: the best objective",
                                  "validation": curve([0, 0.1, 0.2])[2], "curve": curve([0, 0.1, 0.2, 0.9])}},
            "on_test": {"control": {"clean_drop_points": 0.0, "within_budget": True},
                        "ladder": {"clean_drop_points": 0.2 if held else 0.45, "within_budget": held}},
            "budget_held_on_test": held}


def test_checkpoint_selection_section():
    page = render_html({**make_report(), "selection": _selection(True)})
    section = page[page.index('id="selection"'):page.index("</section>", page.index('id="selection"'))]
    assert "held for every model" in section and "did not hold" not in section
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td>", section)
    assert rows == [("Control", "uploaded weights"), ("LADDER", "2")]
    assert len(re.findall(r"<img\b", section)) == 1 and "best transfer pgd on 200" in section
    assert page.index('id="tradeoff"') < page.index('id="selection"')
    missed = render_html({**make_report(), "selection": _selection(False)})
    assert "<strong>did not hold for every model</strong>" in missed and "−0.45" in missed
    assert 'id="selection"' not in render_html(make_report())  # off: no section
    assert "a stratified 10 % of <code>train_data</code>" in section and "Send <code>validation_data</code>" in section
    uploaded = _selection(True)
    uploaded["validation"] |= {"source": "uploaded", "fraction": None}
    page = render_html({**make_report(), "selection": uploaded})
    assert "the job's own <code>validation_data</code>" in page and "training accuracy" not in page
