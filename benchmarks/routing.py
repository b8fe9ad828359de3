"""Routing at run time on CPU: patterndsl's MoBA-style route attention against FlexAttention fed the same choice.

Pattern (LANGUAGE.md section 2, MoBA):
``causal & (blocks(512) | route(topk = 2, block = 512, qblock = 1, among = causal - blocks(512)))``
at B=1, H=8, D=64, fp32 (defaults; see --help).

* ours: ``Pattern.__call__`` on the CPU path, steady state. Inside it, the selection
  (pooled scores, candidates from the plan of ``among``, top-k) and the merge of the
  choice with the static plan (tile lists and gathered rows) are timed on their own
  and printed as a share of our forward.
* flex: what a FlexAttention user does today with a data-dependent choice: every call,
  build a BlockMask from the same choice (``BlockMask.from_kv_blocks`` over per-tile
  unions of the chosen blocks, with a mask_mod that looks the choice up per token; or
  ``create_block_mask`` with ``--create-block-mask``), then run
  ``torch.compile(flex_attention)``. The choice itself is computed by the same code as
  ours and counted in both totals, so the comparison is mask building + attention.

Clustered case (``--case cluster``; issue 18): the Routing Transformer's k-means routing
``causal & cluster(C)`` with 64 centroids at the same sizes. Ours: labels + sort + plan (timed
alone), forward, forward + backward. Flex: ``create_block_mask`` from the same labels (a
``mask_mod`` comparing them, in the original token order) + compiled ``flex_attention``, and
its forward + backward. Also the block efficiency of the label pairs in sorted vs original
order. Targets: sorted efficiency >= 10x unsorted; ours (labels + plan + forward) <= 0.5x
Flex (create_block_mask + forward). Where Flex fails at ``--seq`` (out of memory in
``create_block_mask``), the length is halved until it runs and the ratio is printed there.

Outputs are compared (max abs difference printed; the run fails above 1e-4). Times are
medians of ``--reps`` calls after one warm-up; the machine is shared, so expect noise.
Usage: ``python benchmarks/routing.py [--case moba|cluster|all] [--seq 16384] [--reps 3] [--threads N]
[--create-block-mask] [--clusters 64]``
(``--threads 1`` gives steadier numbers on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import patterndsl
from patterndsl import binding, ir
from patterndsl.runtime import cpu, dynamic, plans
from patterndsl.runtime.cpu import gather as cpu_gather

SOURCE = (
    "pattern moba(block = 512, topk = 2) {{ causal & (blocks(block) | route(topk = topk, block = block,"
    " qblock = 1, among = causal - blocks(block))) }}"
)
FLEX_BLOCK = 128


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def flex_block_mask(chosen: torch.Tensor, L: int, block: int, use_create: bool):
    """A BlockMask for ``causal & (blocks(block) | chosen)`` from the per-token choice ``[B, H, L, n_blocks]``."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    b, h, _, n_blocks = chosen.shape

    def mask_mod(bi, hi, qi, ki):
        kb = ki // block
        return (ki <= qi) & ((qi // block == kb) | chosen[bi, hi, qi, kb])

    if use_create:
        return create_block_mask(mask_mod, b, h, L, L, device="cpu", BLOCK_SIZE=FLEX_BLOCK)
    nt = -(-L // FLEX_BLOCK)
    per = block // FLEX_BLOCK
    pad = nt * FLEX_BLOCK - L
    rows = torch.nn.functional.pad(chosen, (0, 0, 0, pad)).view(b, h, nt, FLEX_BLOCK, n_blocks)
    any_c, all_c = rows.any(3), rows.all(3)  # [B, H, nt, n_blocks]
    kb_block = torch.arange(nt) // per
    routed_any = any_c[..., kb_block]  # [B, H, nt(q), nt(kv)]
    routed_all = all_c[..., kb_block]
    qt, kt = torch.arange(nt)[:, None], torch.arange(nt)[None, :]
    own = (qt // per) == (kt // per)
    below = kt < qt
    full = (own & below) | (routed_all & below)
    partial = ((own & (kt == qt)) | routed_any) & ~full & (kt <= qt)

    def lists(sel):
        num = sel.sum(-1).to(torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full.expand_as(partial))
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod)


CLUSTER_SOURCE = "pattern rt(n = 64) { input C: float[n, dim]\n causal & cluster(C) }"


def _cluster_data(L: int, H: int, D: int, n: int):
    torch.manual_seed(0)
    # Tokens near n directions (as trained queries and keys are), centroids at those directions.
    directions = torch.nn.functional.normalize(torch.randn(n, D), dim=-1)
    q = directions[torch.randint(0, n, (1, H, L))] * 3 + torch.randn(1, H, L, D) * 0.5
    k = directions[torch.randint(0, n, (1, H, L))] * 3 + torch.randn(1, H, L, D) * 0.5
    v = torch.randn(1, H, L, D)
    return q, k, v, directions.clone()


def _ours(args, L: int) -> dict:
    """Our side at length ``L``: labels + sort + plan alone, forward, forward + backward, efficiencies."""
    from patterndsl.analysis import clusterplan
    from patterndsl.primitives import clusters

    H, D, n = args.heads, args.dim, args.clusters
    q, k, v, c = _cluster_data(L, H, D, n)
    pattern = patterndsl.compile(CLUSTER_SOURCE, n=n)
    (prim,) = ir.contents(pattern.ir.default)
    bound = binding.bind(pattern.ir, {"C": c}, L, H, D, 1)

    def labels_and_plan():
        lab = clusters.labels(prim, q, k, bound)
        return lab, clusterplan.sorted_plan(lab.q.reshape(H, L), lab.k.reshape(H, L), False, (64, 64))

    out = {"plan": timed(labels_and_plan, args.reps)}
    lab, plan = labels_and_plan()
    out["sorted"] = plan.stats()
    out["original"] = clusterplan.unsorted_efficiency(lab.q.reshape(H, L), lab.k.reshape(H, L), plan.block)
    out["block"] = plan.block
    out["out"] = pattern(q, k, v, C=c)
    out["fwd"] = timed(lambda: pattern(q, k, v, C=c), args.reps)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out["bwd"] = timed(lambda: pattern(qg, kg, vg, C=c).sum().backward(), max(1, args.reps // 2))
    return out


def _flex(args, L: int) -> dict:
    """Flex at length ``L`` from the same labels: create_block_mask, compiled forward, forward + backward."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from patterndsl.primitives import clusters

    H, D, n = args.heads, args.dim, args.clusters
    q, k, v, c = _cluster_data(L, H, D, n)
    pattern = patterndsl.compile(CLUSTER_SOURCE, n=n)
    (prim,) = ir.contents(pattern.ir.default)
    bound = binding.bind(pattern.ir, {"C": c}, L, H, D, 1)
    flex = torch.compile(flex_attention)

    def flex_mask():
        lab = clusters.labels(prim, q, k, bound)
        lq, lk = lab.q[0], lab.k[0]

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (lq[h, qi] == lk[h, ki])

        return create_block_mask(mask_mod, 1, H, L, L, device="cpu", BLOCK_SIZE=FLEX_BLOCK)

    block_mask = flex_mask()
    out = {"out": flex(q, k, v, block_mask=block_mask)}
    out["mask"] = timed(flex_mask, max(1, args.reps // 2))
    out["fwd"] = timed(lambda: flex(q, k, v, block_mask=block_mask), args.reps)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    try:
        out["bwd"] = timed(lambda: flex(qg, kg, vg, block_mask=block_mask).sum().backward(), max(1, args.reps // 2))
    except NotImplementedError:  # FlexAttention has no backward on CPU
        out["bwd"] = float("nan")
    return out


#: Peak bytes per (head, query, key) pair of CPU ``create_block_mask`` on this mask_mod: it evaluates every
#: pair densely (measured 11-14 bytes at L = 2K-4K, H = 8; torch 2.13).
FLEX_MASK_BYTES_PER_PAIR = 12


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _try_flex(args, L: int):
    """``(result, None)`` or ``(None, why)`` when Flex cannot run at ``L`` (out of memory, typically).

    A length whose dense mask evaluation would not fit in the memory available is not attempted:
    on a shared machine the kernel's OOM killer, not an exception, would end it (possibly another process).
    """
    need = FLEX_MASK_BYTES_PER_PAIR * args.heads * L * L
    have = _available_bytes()
    if have is not None and need > 0.8 * have:
        return None, (
            f"not attempted: create_block_mask evaluates mask_mod on all {args.heads}x{L}x{L} pairs, "
            f"~{need / 2**30:.1f} GiB at {FLEX_MASK_BYTES_PER_PAIR} B/pair, {have / 2**30:.1f} GiB available"
        )
    try:
        return _flex(args, L), None
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def clustered(args) -> int:
    """The Routing Transformer case: ours (labels, sort, plan, sorted attention) against Flex from the same labels.

    When Flex cannot run at ``--seq`` (its ``create_block_mask`` evaluates every pair), the lengths
    are halved until it runs, and both sides are compared there as well.
    """
    L, H, D, n = args.seq, args.heads, args.dim, args.clusters
    print(f"\nRouting Transformer clusters at L={L}, B=1, H={H}, D={D}, fp32, {n} centroids, causal")
    ours = _ours(args, L)
    for name, key in (
        ("ours labels + sort + plan", "plan"),
        ("ours forward (labels + plan + sorted attention)", "fwd"),
        ("ours forward + backward", "bwd"),
    ):
        print(f"{name:68s} {ours[key] * 1e3:9.1f} ms")
    ordered, original = ours["sorted"], ours["original"]
    ratio = ordered["efficiency"] / max(original["efficiency"], 1e-12)
    print(
        f"block efficiency of the label pairs ({ours['block'][0]}x{ours['block'][1]} tiles): sorted "
        f"{ordered['efficiency']:.3f}, original order {original['efficiency']:.4f}: {ratio:.1f}x (target >= 10x)"
    )
    size = L
    flex, why = _try_flex(args, size)
    while flex is None:
        print(f"flex at L={size}: fails ({why})")
        size //= 2
        if size < 1024:
            print("flex runs at no length from 1024 up: no ratio")
            return 0
        flex, why = _try_flex(args, size)
    mine = ours if size == L else _ours(args, size)
    if size != L:
        print(f"largest length Flex runs (halving from {L}): L={size}; ours again at that length:")
        print(f"{'ours forward (labels + plan + sorted attention)':68s} {mine['fwd'] * 1e3:9.1f} ms")
        print(f"{'ours forward + backward':68s} {mine['bwd'] * 1e3:9.1f} ms")
    for name, key in (
        ("flex create_block_mask (from the same labels)", "mask"),
        ("flex forward (compiled, mask given)", "fwd"),
        ("flex forward + backward (mask given; nan: Flex has no CPU backward)", "bwd"),
    ):
        print(f"{name:68s} {flex[key] * 1e3:9.1f} ms")
    print(
        f"at L={size}: ours / flex (labels + plan + forward vs create_block_mask + forward) = "
        f"{mine['fwd'] / (flex['mask'] + flex['fwd']):.3f}x (target <= 0.5x); fwd+bwd ours / flex (mask included) "
        f"= {mine['bwd'] / (flex['mask'] + flex['bwd']):.3f}x"
    )
    diff = float((mine["out"] - flex["out"]).abs().max())
    print(f"max |ours - flex| = {diff:.2e}")
    return 0 if diff <= 1e-4 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("moba", "cluster", "all"), default="all")
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--create-block-mask", action="store_true", help="build Flex's mask with create_block_mask")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    status = 0
    if args.case in ("moba", "all"):
        status |= moba(args)
    if args.case in ("cluster", "all"):
        status |= clustered(args)
    return status


def moba(args) -> int:
    """The MoBA case: ours against Flex fed the same route choice."""
    L, H, D = args.seq, args.heads, args.dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
    pattern = patterndsl.compile(SOURCE.format(), block=args.block, topk=args.topk)
    threads = torch.get_num_threads()
    print(f"MoBA route at L={L}, B=1, H={H}, D={D}, fp32, block={args.block}, topk={args.topk}; {threads} threads")

    ours = pattern(q, k, v)
    t_ours = timed(lambda: pattern(q, k, v), args.reps)

    # The parts of our forward that exist only because the choice is made at run time.
    import patterndsl.runtime as rt

    plan = plans.get(rt._plan_key(pattern.ir, "cpu"), L, L, H)
    dp = dynamic.dynamic_plan(plan)
    t_select = timed(lambda: dynamic.select_all(dp, q, k), args.reps)
    selections = dynamic.select_all(dp, q, k)

    def merge():
        lists = dynamic.tile_lists(dp, selections, 1)
        cpu_gather.plan_work(lists, selections, L, plan.block_m)
        for item in lists:
            cpu.schedule(item.row_ptr, item.cols, item.state, plan, dynamic.tile_mask_fn(dp, item, selections))

    t_merge = timed(merge, args.reps)

    # FlexAttention fed the same choice, per token: chosen[b, h, i, block].
    from torch.nn.attention.flex_attention import flex_attention

    (sel,) = selections.values()
    chosen = sel.chosen[:, :, sel.qgroup]  # [B, Hkv, L, n_blocks], here Hkv == H
    flex = torch.compile(flex_attention)
    t = time.perf_counter()
    theirs = flex(q, k, v, block_mask=flex_block_mask(chosen, L, args.block, args.create_block_mask))
    t_flex_first = time.perf_counter() - t

    def flex_call():
        (s,) = dynamic.select_all(dp, q, k).values()
        bm = flex_block_mask(s.chosen[:, :, s.qgroup], L, args.block, args.create_block_mask)
        return flex(q, k, v, block_mask=bm)

    t_mask = timed(lambda: flex_block_mask(chosen, L, args.block, args.create_block_mask), args.reps)
    t_flex = timed(flex_call, args.reps)
    diff = float((ours - theirs).abs().max())

    how = "create_block_mask" if args.create_block_mask else "BlockMask.from_kv_blocks"
    rows = [
        ("ours forward (selection + merge + attention)", t_ours, None),
        ("  selection (scores, candidates, top-k)", t_select, t_select / t_ours),
        ("  merge with the plan (lists, gathered rows)", t_merge, t_merge / t_ours),
        ("  selection + merge", t_select + t_merge, (t_select + t_merge) / t_ours),
        (f"flex per call (selection + {how} + compiled flex)", t_flex, None),
        (f"  of which {how}", t_mask, None),
        ("  flex first call (mask + compile + run)", t_flex_first, None),
    ]
    for name, sec, share in rows:
        print(f"{name:68s} {sec * 1e3:9.1f} ms" + ("" if share is None else f"  = {share:6.1%} of ours"))
    ratio, share = t_ours / t_flex, t_select / t_ours
    print(f"ours / flex = {ratio:.2f}x (target <= 1.0); selection share = {share:.1%} (target <= 10%)")
    print(f"max |ours - flex| = {diff:.2e}")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
