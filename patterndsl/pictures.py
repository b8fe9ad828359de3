"""Pictures of a block plan: terminal tile maps, statistics text and matplotlib figures.

Comes in: a :class:`~patterndsl.analysis.plan.BlockPlan` (and, for the
figure, optionally a dense mask at small sizes). Goes out: text for
``patterndsl show --stage plan`` and PNG files for ``patterndsl plot``. This
module only draws; it never computes a plan or a mask itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from patterndsl import ir
from patterndsl.analysis.plan import DYNAMIC, EMPTY, FULL, PARTIAL, BlockPlan, PlanStats

#: One character per tile state: empty, partial, full, decided at run time.
UNICODE_CHARS = {EMPTY: " ", PARTIAL: "░", FULL: "█", DYNAMIC: "?"}
ASCII_CHARS = {EMPTY: " ", PARTIAL: ".", FULL: "#", DYNAMIC: "?"}

# Largest map drawn one character per tile; beyond it rows/columns are subsampled.
MAX_ROWS = 48
MAX_COLS = 96


def cell_states(tiles: torch.Tensor, factor_r: int, factor_c: int) -> torch.Tensor:
    """Summarise a tile map ``[nqb, nkb]`` into cells of ``factor_r x factor_c`` tiles.

    A cell is empty when all its tiles are, full when all are full, run-time
    when any tile is, and partial otherwise (a mix of states reads as
    "some work, some masking", which is what a partial tile means).

    Args:
        tiles: int8 tile states of one head.
        factor_r, factor_c: tiles per cell along rows and columns.

    Returns:
        int8 ``[ceil(nqb / factor_r), ceil(nkb / factor_c)]`` cell states.
    """
    nqb, nkb = tiles.shape
    rows, cols = -(-nqb // factor_r), -(-nkb // factor_c)
    # Pad with a sentinel so border cells only look at real tiles.
    pad = torch.full((rows * factor_r, cols * factor_c), -1, dtype=torch.int8)
    pad[:nqb, :nkb] = tiles
    blocks = pad.reshape(rows, factor_r, cols, factor_c).permute(0, 2, 1, 3).reshape(rows, cols, -1)
    real = blocks >= 0
    n_real = real.sum(-1)
    any_dynamic = (blocks == DYNAMIC).any(-1)
    all_empty = ((blocks == EMPTY) | ~real).all(-1)
    all_full = ((blocks == FULL).sum(-1) == n_real) & (n_real > 0)
    out = torch.full((rows, cols), PARTIAL, dtype=torch.int8)
    out[all_empty] = EMPTY
    out[all_full] = FULL
    out[any_dynamic] = DYNAMIC
    return out


def draw_tiles(
    tiles: torch.Tensor, ascii_only: bool = False, max_rows: int = MAX_ROWS, max_cols: int = MAX_COLS
) -> tuple[str, tuple[int, int]]:
    """Draw one head's tile map as framed text, one character per tile (or per cell of tiles).

    Args:
        tiles: int8 ``[nqb, nkb]``.
        ascii_only: use ``' . # ?'`` instead of block characters.
        max_rows, max_cols: the largest map drawn without subsampling.

    Returns:
        ``(text, (factor_r, factor_c))``: the framed map and the subsampling factors used.
    """
    nqb, nkb = tiles.shape
    # One factor for both axes, so a subsampled map keeps the shape of the full one.
    factor_r = factor_c = max(1, math.ceil(nqb / max_rows), math.ceil(nkb / max_cols))
    cells = cell_states(tiles, factor_r, factor_c) if (factor_r, factor_c) != (1, 1) else tiles
    chars = ASCII_CHARS if ascii_only else UNICODE_CHARS
    border = "+" + "-" * cells.shape[1] + "+"
    lines = [border]
    for row in cells.tolist():
        lines.append("|" + "".join(chars[int(s)] for s in row) + "|")
    lines.append(border)
    return "\n".join(lines), (factor_r, factor_c)


def legend(ascii_only: bool = False) -> str:
    """One line explaining the tile characters."""
    c = ASCII_CHARS if ascii_only else UNICODE_CHARS
    return f"'{c[EMPTY]}' empty   '{c[PARTIAL]}' partial   '{c[FULL]}' full   '{c[DYNAMIC]}' decided at run time"


def _head_ranges(heads: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    start = prev = None
    for h in sorted(heads):
        if prev is not None and h == prev + 1:
            prev = h
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = h
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


def draw_plan(plan: BlockPlan, ascii_only: bool = False) -> str:
    """Draw the tile map of every distinct head group of a plan.

    Args:
        plan: the block plan.
        ascii_only: use ASCII characters only.

    Returns:
        Text: per head group a title line (heads, tiles, subsampling) and the framed map, then a legend.
    """
    out: list[str] = []
    nqb, nkb = plan.n_q_tiles, plan.n_kv_tiles
    for index, group in enumerate(plan.groups):
        tiles = group.tiles.to_dense(nqb, nkb)
        text, (fr, fc) = draw_tiles(tiles, ascii_only)
        noun = "head" if len(group.heads) == 1 else "heads"
        title = (
            f"group {index} ({noun} {_head_ranges(group.heads)}): {nqb} x {nkb} tiles of "
            f"{plan.block_m}x{plan.block_n}; rows = query tiles, columns = key tiles"
        )
        if (fr, fc) != (1, 1):
            title += f"; subsampled: one character = {fr} x {fc} tiles"
        out += [title, text]
    out.append(legend(ascii_only))
    return "\n".join(out)


def draw_parts(plan: BlockPlan, ascii_only: bool = False) -> str:
    """Draw each part of a plan that runs as parts (``plan.parts``), empty text when it has none.

    Args:
        plan: the block plan.
        ascii_only: use ASCII characters only.

    Returns:
        Text: per part a title (its order, tile shape, efficiency, each head group's node) and its tile maps.
    """
    out: list[str] = []
    for index, part in enumerate(plan.parts):
        s = part.stats
        nodes = "; ".join(f"heads {_head_ranges(g.heads)}: {g.node}" for g in part.groups if g.node != ir.EMPTY)
        out += [
            f"part {index + 1} of {len(plan.parts)}: order {part.order}, tiles {part.block_m}x{part.block_n}, "
            f"{s.visited_pairs:,} visited pairs, block efficiency {s.block_efficiency:.2%}",
            f"  {nodes}",
            draw_plan(part, ascii_only),
        ]
    return "\n".join(out)


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def format_stats(plan: BlockPlan, head_dim: int = 64) -> str:
    """The statistics block printed under the tile map.

    Args:
        plan: the block plan.
        head_dim: head dimension used for the FLOP estimate.

    Returns:
        Aligned ``name  value`` lines.
    """
    s: PlanStats = plan.stats
    n_tiles = s.tiles_empty + s.tiles_partial + s.tiles_full + s.tiles_dynamic
    flops = s.flops(head_dim)
    rows = [
        ("sizes", f"Lq {plan.q_len}, Lk {plan.kv_len}, heads {plan.heads}, tiles {plan.block_m}x{plan.block_n}"),
        ("density", f"{s.density:.2%} ({s.allowed_pairs:,} of {s.total_pairs:,} pairs allowed)"),
        (
            "tiles",
            f"{s.tiles_empty:,} empty, {s.tiles_partial:,} partial, {s.tiles_full:,} full"
            + (f", {s.tiles_dynamic:,} run-time" if s.tiles_dynamic else "")
            + f" (of {n_tiles:,}, all heads)",
        ),
        ("visited pairs", f"{s.visited_pairs:,} (pairs inside non-empty tiles)"),
        ("block efficiency", f"{s.block_efficiency:.2%} (allowed / visited)"),
        (
            "est. FLOPs",
            f"{_si(flops['useful'], 'FLOP')} useful, {_si(flops['executed'], 'FLOP')} executed "
            f"(forward, head_dim {head_dim}, batch 1)",
        ),
        ("tiles evaluated", f"{s.tiles_evaluated:,} (classified element by element)"),
        ("pairs evaluated", f"{s.elements_evaluated:,} (element by element, for tile states and counts)"),
        ("plan time", f"{s.plan_seconds * 1e3:.2f} ms"),
        ("order", plan.order),
    ]
    if plan.parts:
        rows.append(
            (
                "parts",
                f"{len(plan.parts)}, each with its own order and tiles, merged by log-sum-exp: "
                f"{s.executed_pairs:,} visited pairs, block efficiency {s.executed_efficiency:.2%}",
            )
        )
    if s.tiles_dynamic:
        bound = s.extra.get("dynamic_pairs_bound")
        more = "" if bound is None else f" (the others hold up to {bound:,} more)"
        rows.append(
            ("note", "route(...) tiles are decided at run time: allowed pairs count only the tiles no open route "
             f"candidate reaches{more}; visited pairs count every candidate tile")
        )  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# --------------------------------------------------------------------------- matplotlib


def _pyplot():
    """Import pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        from patterndsl.errors import PatternError

        raise PatternError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_mask(ax, mask: torch.Tensor, title: str) -> None:
    ax.imshow(mask.to(torch.uint8).numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key index")
    ax.set_ylabel("query index")


def plot_plan(
    plan: BlockPlan,
    path: str | Path,
    mask: torch.Tensor | None = None,
    mask_note: str | None = None,
    title: str = "",
) -> Path:
    """Draw the mask (if given) and the tile map of each head group into a PNG.

    Args:
        plan: the block plan.
        path: output file.
        mask: dense bool mask ``[heads, Lq, Lk]`` in original order, or None when too large.
        mask_note: text drawn in place of the mask when it is None (why it was left out).
        title: figure title.

    Returns:
        The path written.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    groups = plan.groups
    # With a reordering, the mask is also drawn in the plan's order so it lines up with the tiles.
    reordered = mask is not None and not plan.is_identity_order
    columns = 1 + (mask is not None or bool(mask_note)) + reordered
    fig, axes = plt.subplots(len(groups), columns, figsize=(5.2 * columns, 4.6 * len(groups)), squeeze=False)
    tile_cmap = ListedColormap(["#ffffff", "#9ecae1", "#08519c", "#fd8d3c"])
    for row, group in enumerate(groups):
        head = group.heads[0]
        heads = ("head " if len(group.heads) == 1 else "heads ") + _head_ranges(group.heads)
        if columns > 1 and mask is None:
            axes[row][0].axis("off")
            axes[row][0].text(0.5, 0.5, mask_note or "", ha="center", va="center", wrap=True, fontsize=9)
        elif columns > 1:
            _draw_mask(axes[row][0], mask[head], f"mask, {heads} ({plan.q_len} x {plan.kv_len}, original order)")
        if reordered:
            permuted = mask[head][plan.q_order][:, plan.kv_order]
            ax = axes[row][1]
            _draw_mask(ax, permuted, f"mask, {heads}, in the plan's order\n(lines: tile borders)")
            if plan.n_q_tiles <= 64 and plan.n_kv_tiles <= 64:
                for y in range(1, plan.n_q_tiles):
                    ax.axhline(y * plan.block_m - 0.5, color="#fd8d3c", linewidth=0.4)
                for x in range(1, plan.n_kv_tiles):
                    ax.axvline(x * plan.block_n - 0.5, color="#fd8d3c", linewidth=0.4)
        ax = axes[row][columns - 1]
        tiles = group.tiles.to_dense(plan.n_q_tiles, plan.n_kv_tiles)
        ax.imshow(tiles.numpy(), cmap=tile_cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(
            f"tiles, {heads} ({plan.block_m}x{plan.block_n}, order: {plan.order})\n"
            "white empty, light partial, dark full, orange run-time",
            fontsize=9,
        )
        ax.set_xlabel("key tile")
        ax.set_ylabel("query tile")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    s = plan.stats
    fig.suptitle(
        f"{title}\ndensity {s.density:.2%}, block efficiency {s.block_efficiency:.2%}, "
        f"tiles {s.tiles_empty} empty / {s.tiles_partial} partial / {s.tiles_full} full",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        from patterndsl.errors import PatternError

        raise PatternError(f"cannot write {str(out)!r}: {exc}") from None
    finally:
        plt.close(fig)
    return out
