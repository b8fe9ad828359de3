"""Stage 5 (codegen): the element rule of head groups whose pattern uses ``route(...)``.

Comes in: a head group's node, its routes and the baked-in sizes. Goes out: the
text of ``_allowed_gN(i, j, h, AUX, RT, lst)`` (plus the corner predicates it
calls) and the layout of the int32 run-time table ``RT`` the kernels read.

Element rule. With routes ``r_1..r_n`` replaced by ``empty`` or ``full`` the
pattern is static: corner ``c`` (bit ``p`` set: route ``p`` full) is rendered
by :func:`patterndsl.codegen.predicate.render_predicate`. At an element each
route is true or false, so the pattern equals the corner whose bits are the
routes' values there; a route's value is one load of this call's chosen table.

``RT`` layout (every offset is baked into the source): for each route ``p`` of
the spec, in order, the query group of every query index (``[LQ]``) and the key
block of every key index (``[LK]``); then, per list ``lst = b * NHK + kv head``,
the chosen tables of every route, ``[n_groups_p, n_blocks_p]`` each, int32 0/1
(``CH_STRIDE`` entries per list). A spec without routes reads one zero.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from patterndsl import ir, semantics
from patterndsl.codegen.predicate import AuxTables, render_predicate


@dataclass(frozen=True)
class RouteTable:
    """Where one route's entries sit in ``RT``.

    Attributes:
        prim: the route.
        groups, blocks: offsets of its query-group and key-block index tables.
        chosen: offset of its chosen table inside a list's slice.
        n_groups, n_blocks: the chosen table's extents.
    """

    prim: ir.Prim
    groups: int
    blocks: int
    chosen: int
    n_groups: int
    n_blocks: int


@dataclass(frozen=True)
class RunTimeLayout:
    """The layout of ``RT`` for one spec: its routes' tables, the start and stride of the chosen tables."""

    tables: tuple[RouteTable, ...]
    chosen_base: int
    chosen_stride: int

    def table(self, prim: ir.Prim) -> RouteTable:
        return next(t for t in self.tables if t.prim == prim)


def layout(routes: tuple[ir.Prim, ...], pattern_layout, q_len: int, kv_len: int) -> RunTimeLayout:
    """The ``RT`` layout of a spec's routes at these sizes (see the module docstring)."""
    ctx = semantics.Context(q_len, kv_len, pattern_layout)
    base = len(routes) * (q_len + kv_len)
    tables, chosen = [], 0
    for p, prim in enumerate(routes):
        n_groups, n_blocks, _, _ = semantics.route_blocks(prim, ctx)
        start = p * (q_len + kv_len)
        tables.append(RouteTable(prim, start, start + q_len, chosen, n_groups, n_blocks))
        chosen += n_groups * n_blocks
    return RunTimeLayout(tuple(tables), base, chosen)


def run_time_table(
    routes: tuple[ir.Prim, ...], pattern_layout, q_len: int, kv_len: int, chosen: dict[ir.Prim, torch.Tensor]
) -> torch.Tensor:
    """The int32 ``RT`` tensor for one call.

    Args:
        routes, pattern_layout, q_len, kv_len: as :func:`layout`.
        chosen: route -> bool ``[batch, kv_heads, n_groups, n_blocks]`` (this call's choice).

    Returns:
        int32 ``RT`` on the device of the chosen tables (one zero without routes).
    """
    if not routes:
        return torch.zeros(1, dtype=torch.int32)
    ctx = semantics.Context(q_len, kv_len, pattern_layout)
    device = chosen[routes[0]].device
    parts = []
    for prim in routes:
        _, _, groups, blocks = semantics.route_blocks(prim, ctx)
        parts += [groups, blocks]
    index = torch.cat(parts).to(device=device, dtype=torch.int32)
    per_list = [chosen[prim].flatten(2).flatten(0, 1) for prim in routes]  # [lists, n_groups * n_blocks]
    tables = torch.cat(per_list, 1).to(torch.int32).flatten()
    return torch.cat([index, tables])


def render_group(
    name: str, node: ir.Node, run_time: RunTimeLayout, pattern_layout, q_len: int, kv_len: int, aux: AuxTables,
    heads: int,
) -> str:  # fmt: skip
    """``name(i, j, h, AUX, RT, lst)``: the element rule of one head group, and the predicates it calls.

    Args:
        name: the function name (``_allowed_gN``).
        node: the group's pattern node.
        run_time: the spec's ``RT`` layout.
        pattern_layout, q_len, kv_len, heads: the baked-in sizes.
        aux: receives the ``random`` tables the predicates read.

    Returns:
        Source text of the corner predicates followed by the element rule.
    """
    routes = ir.routes(node)
    corners = list(itertools.product((0, 1), repeat=len(routes)))
    funcs, terms = [], []
    for c, bits in enumerate(corners):
        values = {r: (ir.FULL if bit else ir.EMPTY) for r, bit in zip(routes, bits, strict=True)}
        pred = f"{name}_c{c}" if routes else f"{name}_pattern"
        funcs.append(render_predicate(pred, ir.replace(node, values), pattern_layout, q_len, kv_len, aux, heads))
        conds = [f"r{p}" if bit else f"(r{p} == 0)" for p, bit in enumerate(bits)]
        terms.append(" & ".join([*conds, f"{pred}(i, j, h, AUX)"]))
    lines = [
        "@triton.jit",
        f"def {name}(i, j, h, AUX, RT, lst):",
    ]
    if not routes:
        lines.append('    """Element rule: the pattern\'s predicate (no run-time input)."""')
    else:
        lines += [
            '    """Element rule: route p holds at (i, j) where this call chose key block(j) for query group(i),',
            "    RT[chosen_p + lst * CH_STRIDE + group(i) * n_blocks_p + block(j)]; the routes' values pick the",
            '    corner (each route replaced by full or empty) that equals the pattern there."""',
            "    inb = (i < LQ) & (j < LK)",
        ]
    for p, prim in enumerate(routes):
        t = run_time.table(prim)
        chosen = run_time.chosen_base + t.chosen
        lines += [
            f"    # r{p}: {prim}",
            f"    g{p} = tl.load(RT + {t.groups} + i, mask=i < LQ, other=0)",
            f"    b{p} = tl.load(RT + {t.blocks} + j, mask=j < LK, other=0)",
            f"    r{p} = tl.load(RT + {chosen} + lst * CH_STRIDE + g{p} * {t.n_blocks} + b{p}, mask=inb, other=0) != 0",
        ]
    if len(terms) == 1:
        lines.append(f"    return {terms[0]}")
    else:
        lines += ["    return (", f"        ({terms[0]})", *(f"        | ({t})" for t in terms[1:]), "    )"]
    return "\n\n".join([*funcs, "\n".join(lines) + "\n"])
