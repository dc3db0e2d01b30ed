"""The geometry of the dashboard's two charts, computed from :func:`skillhub.analytics.analyze`'s answer: the overlap
matrix as a heatmap and each skill's per-layer share as grouped bars. Plain numbers and strings for the SVG templates
(``templates/charts.html``): no chart library, nothing fetched."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: one colour per skill, in name order (Tableau 10: distinguishable, also in grey scale print)
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
LOW, HIGH = (247, 251, 255), (8, 48, 107)  # the heatmap's scale: white to deep blue
CELL = 64
MAX_LABEL = 24


def natural(key: str) -> list[Any]:
    """Sort key that puts ``blocks.2`` before ``blocks.10`` (the model's order, not the alphabet's)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def colours(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(names))}


def short(text: str, n: int = MAX_LABEL) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _blend(t: float) -> str:
    t = min(max(t, 0.0), 1.0)
    r, g, b = (round(lo + (hi - lo) * t) for lo, hi in zip(LOW, HIGH))
    return f"#{r:02x}{g:02x}{b:02x}"


def pct(x: float) -> str:
    """A share as a short percentage: 3 significant digits below 1%."""
    x *= 100
    return f"{x:.3g}%" if 0 < x < 1 else f"{x:.1f}%"


def heatmap(an: Mapping[str, Any]) -> dict[str, Any]:
    """The overlap matrix: one cell per pair coloured by Jaccard (scaled to the largest pair's, named in the legend),
    labelled with Jaccard and the sign-conflict share; the diagonal holds each skill's own mask share."""
    names = sorted(an["skills"])
    pairs = {(p["a"], p["b"]): p for p in an["pairs"]}
    top = max((p["jaccard"] for p in an["pairs"]), default=0.0)
    label_w = 8 + 7 * min(MAX_LABEL, max((len(n) for n in names), default=1))
    left, head = label_w, max(40, label_w)
    cells = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            x, y = left + j * CELL, head + i * CELL
            if i == j:
                s = an["skills"][a]
                cells.append({"x": x, "y": y, "fill": "#eeeeee", "text": "#444444", "line1": pct(s["share"]),
                              "line2": "own mask", "title": f"{a}: {s['nnz']:,} entries, {pct(s['share'])} of the "
                                                             "merged parameters", "a": a, "b": b})
                continue
            p = pairs.get((a, b)) or pairs[(b, a)]
            t = p["jaccard"] / top if top > 0 else 0.0
            cells.append({"x": x, "y": y, "fill": _blend(t), "text": "#ffffff" if t > 0.55 else "#222222",
                          "line1": pct(p["jaccard"]), "line2": f"± {pct(p['sign_conflict'])}",
                          "title": f"{a} × {b}: {p['both']:,} entries in both masks, Jaccard {p['jaccard']:.4f}, "
                                   f"opposite signs on {pct(p['sign_conflict'])} of them", "a": a, "b": b})
    size = len(names) * CELL
    return {"names": [{"name": n, "label": short(n), "pos": left + i * CELL + CELL // 2,
                       "row": head + i * CELL + CELL // 2} for i, n in enumerate(names)],
            "cells": cells, "cell": CELL, "left": left, "head": head, "width": left + size + 8,
            "height": head + size + 6, "top": pct(top) if top else "0%"}


def bars(an: Mapping[str, Any], *, width: int = 380, bar: int = 9) -> dict[str, Any]:
    """Grouped horizontal bars: per layer (in the model's order), one bar per skill, its share of that layer."""
    names = sorted(an["skills"])
    palette = colours(names)
    layers = sorted(an["layer_sizes"], key=natural)
    peak = max((s["layers"].get(p, 0.0) for s in an["skills"].values() for p in layers), default=0.0) or 1.0
    label_w = 8 + 7 * min(28, max((len(p) for p in layers), default=1))
    group = max(1, len(names)) * bar + 8
    rows = []
    for i, layer in enumerate(layers):
        y = 24 + i * group
        items = []
        for j, n in enumerate(names):
            share = an["skills"][n]["layers"].get(layer, 0.0)
            items.append({"y": y + j * bar, "w": round(width * share / peak, 1), "fill": palette[n], "share": share,
                          "label": pct(share), "title": f"{n}: {pct(share)} of {layer} "
                                                        f"({an['layer_sizes'][layer]:,} parameters)"})
        rows.append({"layer": layer, "label": short(layer, 28), "y": y, "mid": y + len(names) * bar / 2 + 4,
                     "bars": items})
    return {"rows": rows, "left": label_w, "width": label_w + width + 70, "height": 30 + len(layers) * group,
            "legend": [{"name": n, "fill": palette[n], "x": label_w + k * 110} for k, n in enumerate(names)],
            "peak": pct(peak), "bar": bar - 1}
