"""Draw docs/images/buckets_14_vs_24.png: iRPE bucket maps on the 14 x 14 and 24 x 24 grids per resize strategy.

    python docs/bucket_maps.py [OUT.png]

Each panel colours every key position by its bucket for the query in the top-left corner (so the
whole offset range shows); keys whose bucket the 14 x 14 grid never reaches (a table entry no
224 training step updated) are hatched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from finetune.backbones.irpe import RPEConfig, bucket_ids  # noqa: E402
from finetune.resize import interpolated_config  # noqa: E402

OUT = Path(__file__).resolve().parent / "images" / "buckets_14_vs_24.png"


def _panel(ax, method: str, config: RPEConfig, grid: int, trained: set[int] | None, title: str) -> None:
    ids = bucket_ids(method, grid, grid, config)[0].reshape(grid, grid)  # query at (0, 0), no class token
    ax.imshow(ids, cmap="viridis", interpolation="nearest")
    used = set(ids.unique().tolist())
    if trained is not None:
        untrained = torch.tensor([[int(v) not in trained for v in row] for row in ids.tolist()])
        if untrained.any():
            ax.contourf(untrained.float(), levels=[0.5, 1.5], hatches=["////"], colors="none")
        title += f"\n{len(used)} buckets, {len(used - trained)} never trained"
    else:
        title += f"\n{len(used)} buckets"
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def draw(out: Path = OUT) -> Path:
    """Two rows: product ratio 1.9 (the official setting) and cross ratio 20 (rows table); columns:
    14 x 14 as trained, then 24 x 24 under keep, scale and (where it applies) interpolate."""
    rows = [("product, ratio 1.9", "product", RPEConfig(ratio=1.9, skip=0)),
            ("cross, ratio 20 (rows table)", "cross_rows", RPEConfig(method="cross", ratio=20, skip=0))]
    fig, axes = plt.subplots(len(rows), 4, figsize=(11, 5.8))
    for (label, method, config), row in zip(rows, axes, strict=True):
        trained = set(bucket_ids(method, 14, 14, config).unique().tolist())
        _panel(row[0], method, config, 14, None, f"{label}\n14x14 (trained)")
        _panel(row[1], method, config, 24, trained, "24x24 keep")
        scaled = RPEConfig.from_any({**config.to_dict(), "resize": "scale", "trained_grid": (14, 14)})
        _panel(row[2], method, scaled, 24, trained, "24x24 scale")
        try:
            new = interpolated_config(config, (14, 14), (24, 24))
        except ValueError:
            row[3].text(0.5, 0.5, "interpolate: n/a\n(buckets not linear\nin the offset)", ha="center", va="center")
            row[3].axis("off")
            continue
        _panel(row[3], method, new, 24, None, f"24x24 interpolate (ratio {new.ratio:g})\nresampled table")
    fig.suptitle("Bucket of each key for the query at the top-left corner (hatched: bucket never trained at 14x14)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
