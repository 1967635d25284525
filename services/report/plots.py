"""Figures of the evaluation report, as PNG bytes.

Every function builds its own `matplotlib.figure.Figure` (no pyplot, no global rcParams) and
saves it without the "Software" metadata, so the same input always gives the same bytes.
Figures are drawn at `WIDTH_IN` inches and saved at `DPI`; the page shows them at
`display_width(png)` CSS pixels (100 px per inch), i.e. crisp on high-density screens.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

DPI = 200  # saved resolution; the page shows 100 px per inch
WIDTH_IN = 8.4  # ≈ 840 px on the page
FONT = 10
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"]
SETTING_MARKERS = {"blackbox": "o", "whitebox": "s"}
SETTING_LABELS = {"blackbox": "black-box", "whitebox": "white-box"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG header."""
    return struct.unpack(">II", png[16:24])


def display_width(png: bytes) -> int:
    """The width in CSS pixels at which the page shows a PNG made here."""
    return round(png_size(png)[0] * 100 / DPI)


def _style(ax) -> None:
    ax.tick_params(labelsize=FONT - 1, length=3, color="#666666")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#888888")
    ax.grid(True, color="#e6e6e6", linewidth=0.7)
    ax.set_axisbelow(True)


def _plain(texts) -> None:
    """Names come from users: never read `$` as mathtext."""
    for t in texts:
        t.set_parse_math(False)


def _place_labels(ax, points: Sequence[tuple[float, float]], labels: Sequence[str], fontsize: float) -> None:
    """Name every point, greedily: beside it when free, else the nearest free slot above or below, with a leader line.

    A slot is free when the label's box overlaps no other label, no point and stays inside the axes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = ax.figure
    renderer = FigureCanvasAgg(fig).get_renderer()
    px = fig.dpi / 72
    box = ax.get_window_extent(renderer)
    disp = ax.transData.transform(np.asarray(points, dtype=float).reshape(-1, 2))
    r = 4.5 * px  # half a marker
    taken = [(x - r, y - r, x + r, y + r) for x, y in disp]
    inv = ax.transData.inverted()
    order = sorted(range(len(points)), key=lambda i: (-disp[i][1], disp[i][0]))
    for i in order:
        x, y = disp[i]
        probe = ax.text(0, 0, labels[i], fontsize=fontsize)
        probe.set_parse_math(False)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width, ext.height
        step = h * 0.9
        best = None
        for k in range(40):
            dy = (k + 1) // 2 * step * (1 if k % 2 else -1) if k else 0.0
            for side in (1, -1):
                x0 = x + 8 * px if side > 0 else x - 8 * px - w
                cand = (x0, y + dy - h / 2, x0 + w, y + dy + h / 2)
                inside = cand[0] >= box.x0 and cand[2] <= box.x1 and cand[1] >= box.y0 and cand[3] <= box.y1
                free = all(cand[2] <= t[0] or cand[0] >= t[2] or cand[3] <= t[1] or cand[1] >= t[3] for t in taken)
                if inside and free:
                    best = (cand, side, dy)
                    break
            if best:
                break
        if best is None:
            best = ((x + 8 * px, y - h / 2, x + 8 * px + w, y + h / 2), 1, 0.0)
        cand, side, dy = best
        taken.append(cand)
        tx, ty = inv.transform((cand[0] if side > 0 else cand[2], y + dy))
        arrow = None if abs(dy) < 1 else {"arrowstyle": "-", "color": "#b0b0b0", "lw": 0.6, "shrinkA": 1, "shrinkB": 4}
        t = ax.annotate(labels[i], tuple(inv.transform((x, y))), xytext=(tx, ty), textcoords="data", fontsize=fontsize,
                        va="center", ha="left" if side > 0 else "right", color="#222222", annotation_clip=False,
                        arrowprops=arrow)
        t.set_parse_math(False)


def tradeoff(points: Sequence[tuple[str, str, float, float]], colors: Mapping[str, str] | None = None) -> bytes:
    """Clean accuracy (x) vs worst-case robust accuracy (y), both in %: one point per (label, setting, clean, worst)."""
    fig = Figure(figsize=(WIDTH_IN, 4.6))
    ax = fig.add_subplot()
    _style(ax)
    names = list(dict.fromkeys(p[0] for p in points))
    colors = dict(colors or {})
    for i, n in enumerate(names):
        colors.setdefault(n, PALETTE[i % len(PALETTE)])
    settings = list(dict.fromkeys(p[1] for p in points))
    for name, setting, x, y in points:
        ax.scatter([x], [y], s=46, marker=SETTING_MARKERS.get(setting, "D"), color=colors[name],
                   edgecolor="white", linewidth=0.8, zorder=3)
    xs = [p[2] for p in points] or [0.0]
    ys = [p[3] for p in points] or [0.0]
    xpad = max(0.5, (max(xs) - min(xs)) * 0.06)
    ypad = max(2.0, (max(ys) - min(ys)) * 0.10)
    lo, hi = min(xs) - xpad, max(xs) + xpad
    ax.set_xlim(lo, hi + (hi - lo) * 0.18)  # room for the labels right of the points
    ylo, yhi = max(-2.0, min(ys) - ypad), min(102.0, max(ys) + ypad)
    if yhi - ylo < 10:  # a sensible span even when every model has about the same robustness
        yhi = min(102.0, ylo + 10)
        ylo = min(ylo, yhi - 10)
    ax.set_ylim(ylo, yhi)
    ax.set_xlabel("clean accuracy (%)", fontsize=FONT)
    ax.set_ylabel("worst-case robust accuracy (%)", fontsize=FONT)
    handles = [Line2D([], [], marker=SETTING_MARKERS.get(s, "D"), linestyle="", color="#555555", markersize=6,
                      label=SETTING_LABELS.get(s, s)) for s in settings]
    if handles:
        leg = ax.legend(handles=handles, fontsize=FONT - 1, loc="lower right", bbox_to_anchor=(1.0, 1.0),
                        ncol=len(handles), frameon=False, borderaxespad=0.2, handletextpad=0.3, columnspacing=1.2)
        _plain(leg.get_texts())
    fig.tight_layout()
    if points:
        _place_labels(ax, [(p[2], p[3]) for p in points], [p[0] for p in points], FONT - 1)
    return _png(fig)


def crossing_curve(eps: Sequence[float], rate: Sequence[float], chosen: Sequence[tuple[float, float | None, str]],
                   variants: Mapping[str, Sequence[tuple[float, float | None]]] | None = None) -> bytes:
    """Crossing rate (%) against ε (log x); `chosen` = (ε, measured rate or None, label) marked on the curve."""
    fig = Figure(figsize=(WIDTH_IN, 3.6))
    ax = fig.add_subplot()
    _style(ax)
    pts = [(e, r) for e, r in zip(eps, rate) if e is not None and r is not None and e > 0 and math.isfinite(e)]
    if pts:
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=PALETTE[0], linewidth=1.6, label="LADDER (boundary normal)")
    for k, (e, r, label) in enumerate(chosen):
        if e is None or not e > 0:
            continue
        ax.axvline(e, color="#999999", linestyle=":", linewidth=0.9, zorder=1)
        if r is not None:
            ax.plot([e], [100 * r], marker="o", color=PALETTE[3], markersize=5, zorder=4,
                    label="chosen ε (measured)" if k == 0 else None)
        t = ax.annotate(label, (e, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -2), textcoords="offset points",
                        fontsize=FONT - 2, color="#555555", va="top", rotation=90)
        t.set_parse_math(False)
    for i, (name, values) in enumerate((variants or {}).items()):
        vp = [(e, r) for e, r in values if e is not None and r is not None and e > 0]
        if vp:
            ax.plot([p[0] for p in vp], [100 * p[1] for p in vp], marker="^s"[i % 2] if i < 2 else "D", linestyle="--",
                    linewidth=0.9, markersize=5, color=PALETTE[(i + 1) % len(PALETTE)], label=name)
    if pts or chosen:
        ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.set_xlabel("ε (latent step along the boundary normal)", fontsize=FONT)
    ax.set_ylabel("latents crossing the boundary (%)", fontsize=FONT)
    if ax.get_legend_handles_labels()[0]:
        leg = ax.legend(fontsize=FONT - 1, loc="upper left", frameon=False)  # crossing rates rise with ε
        _plain(leg.get_texts())
    fig.tight_layout()
    return _png(fig)


def selection_curve(curves: Mapping[str, Sequence[tuple[float, float, float | None]]], chosen: Mapping[str, float],
                    budget_points: float, objective: str, colors: Mapping[str, str]) -> bytes:
    """Checkpoint selection: per model, validation clean drop (points, left) and the objective (%, right; the rank
    objective: average rank, no unit, lower is better) against the checkpoint's epoch (0 = the uploaded model); the
    budget as a dashed line, each model's chosen checkpoint ringed. A checkpoint without an objective (rank, outside
    the budget) has no dotted point."""
    scale = 1 if objective == "rank" else 100
    fig = Figure(figsize=(WIDTH_IN, 3.6))
    ax = fig.add_subplot()
    _style(ax)
    right = ax.twinx()
    for name, pts in curves.items():
        c = colors.get(name, PALETTE[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, linewidth=1.4, marker="o", markersize=3, label=name)
        scored = [p for p in pts if p[2] is not None]
        right.plot([p[0] for p in scored], [scale * p[2] for p in scored], color=c, linewidth=1.0, linestyle=":",
                   marker="s", markersize=3)
        at = [p for p in pts if p[0] == chosen.get(name)]
        if at:
            ax.plot([at[0][0]], [at[0][1]], marker="o", markersize=9, markerfacecolor="none", markeredgecolor=c, zorder=4)
    ax.axhline(budget_points, color="#999999", linestyle="--", linewidth=0.9)
    ax.set_xlabel("epoch (0 = the uploaded model)", fontsize=FONT)
    ax.set_ylabel("validation clean drop (points, solid)", fontsize=FONT)
    right.set_ylabel("average rank on validation (lower is better, dotted)" if objective == "rank" else
                     f"{objective.replace('_', ' ')} on validation (%, dotted)", fontsize=FONT)
    right.tick_params(labelsize=FONT - 1)
    if ax.get_legend_handles_labels()[0]:
        leg = ax.legend(fontsize=FONT - 1, loc="upper left", frameon=False)
        _plain(leg.get_texts())
    fig.tight_layout()
    return _png(fig)


def _fmt_s(s: float) -> str:
    if s < 100:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    return f"{s:.0f} s ({m} min {sec:02d} s)" if m < 60 else f"{s:.0f} s ({m // 60} h {m % 60:02d} min)"


def timeline(stages: Sequence[tuple[str, float]], finetune: Sequence[tuple[str, float]] = (),
             finetune_stage: str = "finetune") -> bytes:
    """Gantt chart of stage times (cumulative starts); per-model fine-tuning as sub-bars under its stage."""
    rows: list[tuple[str, float, float, str, bool]] = []  # label, start, width, color, sub-row
    start = 0.0
    for i, (name, sec) in enumerate(stages):
        sec = max(0.0, float(sec))
        rows.append((name, start, sec, PALETTE[i % len(PALETTE)], False))
        if name == finetune_stage:
            sub = start
            for model, s in finetune:
                s = max(0.0, float(s))
                rows.append((f"  {model}", sub, s, PALETTE[i % len(PALETTE)], True))
                sub += s
        start += sec
    total = start
    fig = Figure(figsize=(WIDTH_IN, 0.9 + 0.3 * max(1, len(rows))))
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(True, axis="x", color="#e6e6e6", linewidth=0.7)
    ax.grid(False, axis="y")
    for k, (_label, s0, w, color, sub) in enumerate(rows):
        ax.barh(k, w, left=s0, height=0.45 if sub else 0.7, color=color, alpha=0.55 if sub else 0.95,
                edgecolor="white", linewidth=0.6)
        t = ax.text(s0 + w + total * 0.006, k, _fmt_s(w), va="center", fontsize=FONT - 1 - sub, color="#333333")
        t.set_parse_math(False)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    _plain(ax.get_yticklabels())
    for lab, r in zip(ax.get_yticklabels(), rows):
        lab.set_fontsize(FONT - 1 - r[4])
        lab.set_color("#666666" if r[4] else "#222222")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, max(total, 1e-9) * 1.16)
    ax.set_xlabel(f"seconds since start (total {_fmt_s(total)})", fontsize=FONT)
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0)
    fig.tight_layout()
    return _png(fig)


def _as_array(images) -> np.ndarray:
    """A float array (N, C, H, W) in [0, 1] from a numpy array or a torch tensor (no torch import here)."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().float().numpy()
    a = np.asarray(images, dtype=np.float32)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise ValueError(f"gallery images must have shape (N, C, H, W), not {a.shape}")
    return np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)


def gallery(rows: Sequence[tuple[str, object]], titles: Sequence[str]) -> bytes:
    """A grid: one row per (label, images (N, C, H, W)), one column per image, `titles` over the columns."""
    arrays = [(label, _as_array(images)) for label, images in rows]
    ncols = max([len(titles), *(len(a) for _, a in arrays)])
    nrows = max(1, len(arrays))
    h, w = arrays[0][1].shape[2:] if arrays else (1, 1)
    cell = min(1.05, (WIDTH_IN - 0.9) / ncols)
    top_in = 0.48  # two lines of column titles
    fig = Figure(figsize=(0.9 + cell * ncols, top_in + 0.05 + cell * (h / w) * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False,
                        gridspec_kw={"left": 0.9 / (0.9 + cell * ncols), "right": 0.995, "wspace": 0.06, "hspace": 0.06,
                                     "top": 1 - top_in / (top_in + 0.05 + cell * (h / w) * nrows),
                                     "bottom": 0.05 / (top_in + 0.05 + cell * (h / w) * nrows)})
    for r in range(nrows):
        label, a = arrays[r] if arrays else ("", np.zeros((0, 1, 1, 1)))
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color("#bbbbbb")
                s.set_linewidth(0.6)
            if c < len(a):
                img = a[c]
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(np.transpose(img[:3], (1, 2, 0)), interpolation="nearest")
            else:
                ax.set_visible(False)
            if c == 0:
                t = ax.set_ylabel(label, fontsize=FONT, rotation=0, ha="right", va="center", labelpad=6)
                t.set_parse_math(False)
            if r == 0 and c < len(titles):
                t = ax.set_title(titles[c], fontsize=FONT - 1.5, pad=4, color="#222222")
                t.set_parse_math(False)
    return _png(fig)
