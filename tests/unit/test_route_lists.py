"""The per-call tile lists of route patterns on the Triton backend (runtime/triton_route.py), without Triton.

Rows and their transpose must hold the same (list, query tile, key tile) entries, partial tiles
first in every segment, the key tail tile never unmasked, and the run-time table must hold each
route's chosen table where the kernels' element rule reads it.
"""

from __future__ import annotations

import torch

import patterndsl
from patterndsl.codegen import generator
from patterndsl.runtime import dynamic, triton_backend, triton_route


def _entries(ptr, split, values, n_tiles, full_of):
    out = set()
    for segment in range(ptr.numel() - 1):
        lst, tile = divmod(segment, n_tiles)
        start, mid, end = int(ptr[segment]), int(split[segment]), int(ptr[segment + 1])
        for idx in range(start, end):
            other = int(values[idx])
            # Partial entries come before `split`, full ones after it.
            assert full_of(lst, tile, other) == (idx >= mid), (lst, tile, other)
            out.add((lst, tile, other))
    return out


def test_rows_and_columns_hold_the_same_tiles_and_rt_the_choice():
    # where(k >= 32): the key tail tile (keys 32..44) is full in every row, yet must run masked.
    source = "pattern r { where(k >= 32) | sink(3) | route(2, block = 8, qblock = 4, among = causal) }"
    pattern = patterndsl.compile(source)
    b, h, hkv, lq, d = 2, 4, 2, 45, 16  # 45 % 16: the last key tile has a tail
    plan = pattern.plan(lq, lq, h, block=(16, 16), order="identity")
    spec = generator.make_spec(plan, "backward", d, torch.float32, hkv, "interpret")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, lq, d, generator=gen)
    k = torch.randn(b, hkv, lq, d, generator=gen)
    prep = triton_backend.prepared(plan, spec, q.device)
    groups, rt = triton_route.run_time_lists(plan, spec, q, k, prep["groups"])
    dp = dynamic.dynamic_plan(plan)
    selections = dynamic.select_all(dp, q, k)
    ((row_ptr, cols, state),) = dynamic.kernel_lists(dp, selections, b, hkv)
    want = {}
    for lst in range(b * hkv):
        for m in range(plan.n_q_tiles):
            for idx in range(int(row_ptr[lst, m]), int(row_ptr[lst, m + 1])):
                want[lst, m, int(cols[idx])] = int(state[idx])
    tail = plan.n_kv_tiles - 1
    (r_ptr, r_split, r_cols, c_ptr, c_split, c_rows, heads) = groups[0]
    rows = _entries(r_ptr, r_split, r_cols, plan.n_q_tiles, lambda lst, m, n: want[lst, m, n] == 2 and n != tail)
    columns = _entries(c_ptr, c_split, c_rows, plan.n_kv_tiles, lambda lst, n, m: want[lst, m, n] == 2)
    assert rows == set(want) and {(lst, m, n) for lst, n, m in columns} == set(want)
    assert heads.tolist() == list(range(h))
    # RT: where the element rule reads route p's choice for list lst, group g, block n.
    (prim,) = spec.route_list
    table = spec.run_time_layout().table(prim)
    chosen = selections[prim].chosen.reshape(b * hkv, table.n_groups, table.n_blocks)
    base = spec.run_time_layout().chosen_base + table.chosen
    stride = spec.run_time_layout().chosen_stride
    for lst in range(b * hkv):
        got = rt[base + lst * stride : base + (lst + 1) * stride].view(table.n_groups, table.n_blocks)
        assert torch.equal(got.bool(), chosen[lst])
    assert torch.equal(rt[table.groups : table.groups + lq], selections[prim].qgroup.to(torch.int32))
    assert torch.equal(rt[table.blocks : table.blocks + lq], selections[prim].kblock.to(torch.int32))
