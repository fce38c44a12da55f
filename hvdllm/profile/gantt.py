"""The pipeline, drawn: one row per rank, one bar per span of a step (profile/spans.py).

    stage 0 |F0|F1|F2|  |B0|F3|B1|  |B2| |B3|sync|opt|
    stage 1 |..|F0|B0|..|F1|B1|..|F2|B2|F3|B3|sync|opt|      .. = waiting for a message

Rows are aligned on the wall clock (each rank's step start), so a stage that waits shows as a
gap filled with its receive-wait bar. The title gives the measured bubble, computed from the
same spans: the mean over the drawn ranks of (receive waits / step time), which is what the
step's `bubble` metric averages (parallel/pipeline.py times both with the same clock reads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {"data": "#ccb974", "forward": "#4c72b0", "backward": "#55a868", "recv": "#c44e52",
          "send": "#dd8452", "sync": "#8172b3", "optimizer": "#937860"}
LEGEND = {"data": "reading the batch", "forward": "forward", "backward": "backward",
          "recv": "waiting to receive", "send": "waiting for sends", "sync": "gradient sync",
          "optimizer": "optimizer"}
MAX_ROWS = 16
"""Larger worlds draw replica 0 only (one row per stage)."""


def rows_to_draw(records: list[dict]) -> list[dict]:
    """Every rank's record, ordered by replica then stage; replica 0 only past MAX_ROWS ranks."""
    records = sorted(records, key=lambda r: (r["replica"], r["stage"]))
    return records if len(records) <= MAX_ROWS else [r for r in records if r["replica"] == 0]


def measured_bubble(records: list[dict]) -> float:
    """Mean over ranks of the share of the step spent blocked in receives."""
    shares = [sum(s["end"] - s["start"] for s in r["spans"] if s["kind"] == "recv") / r["step_s"]
              for r in records]
    return sum(shares) / len(shares)


def draw(records: list[dict], step: int, title: str, path: Path) -> np.ndarray:
    """Write the chart of one step to `path` (PNG); returns it as an H x W x 3 uint8 image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = rows_to_draw(records)
    t0 = min(r["wall_start"] for r in rows)
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.6))
    for y, r in enumerate(rows):
        shift = r["wall_start"] - t0
        for s in r["spans"]:
            start, width = 1000 * (shift + s["start"]), 1000 * (s["end"] - s["start"])
            ax.broken_barh([(start, width)], (y - 0.38, 0.76), color=COLORS[s["kind"]])
            if s["micro"] >= 0 and s["kind"] in ("forward", "backward") and width > 0:
                ax.text(start + width / 2, y, f"{s['kind'][0].upper()}{s['micro']}",
                        ha="center", va="center", fontsize=7, color="white", clip_on=True)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"stage {r['stage']} · replica {r['replica']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first rank began the step")
    ax.set_title(f"step {step}: {title}", fontsize=10)
    kinds = [k for k in COLORS if any(s["kind"] == k for r in rows for s in r["spans"])]
    ax.legend(handles=[Patch(color=COLORS[k], label=LEGEND[k]) for k in kinds], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.28 if len(rows) < 3 else -0.12),
              ncol=len(kinds), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
