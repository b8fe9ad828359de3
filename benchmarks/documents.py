"""Packed causal documents: patterndsl's call-time plan and attention vs FlexAttention and SDPA per document.

One run, the same inputs for every method: B=1, H=8, D=64, float32, causal documents of random
lengths (64 documents at 16K tokens, 512 at 128K), the pattern
``within(doc, causal)`` with ``doc`` the document id of every token.

Prints, per length:

* the call-time plan (``Pattern.plan(..., doc=ids)`` after the sizes' static plan is cached: what
  every training step pays) -- time and peak memory above the baseline, each measured in a fresh
  subprocess -- against FlexAttention's ``create_block_mask`` with attn-gym's
  ``generate_doc_mask_mod(causal_mask, offsets)`` (reproduced below) at 16K; at 128K the dense
  ``Lq x Lk`` work of ``create_block_mask`` is attempted only with ``--flex-128k`` (it ran out of
  memory at 64K in issue 12); otherwise the script says whether its ``Lq x Lk`` boolean mask
  would fit in this machine's memory;
* at 16K: our forward and forward + backward against compiled ``flex_attention`` forward with that
  block mask, and against SDPA run document by document (``is_causal=True``).

Targets (issue 12): plan at 128K under 5 ms and 16 MB; plan + forward at 16K at most 0.8x Flex's
``create_block_mask`` + forward; forward alone at most 1.0x Flex's forward. Timings on a loaded
machine are provisional.

Run: ``python benchmarks/documents.py [--repeat 3] [--sizes 16384,131072] [--no-flex] [--flex-128k]
[--threads N]``
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import patterndsl  # noqa: E402

#: examples/packed_documents.pdsl: within(doc, causal & (window(1024) | sink(4))), planned for the same documents.
PACKED = HERE.parent / "examples" / "packed_documents.pdsl"
SOURCE = "pattern documents {\n    input doc: int[batch, token]\n    within(doc, causal)\n}\n"
DOCS = {16 * 1024: 64, 128 * 1024: 512}
HEADS, DIM = 8, 64
TARGET_PLAN_MS, TARGET_PLAN_MB = 5.0, 16.0
TARGET_PLAN_FORWARD, TARGET_FORWARD = 0.8, 1.0


def lengths(total: int, count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), count - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def offsets_of(sizes: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)


# attn-gym, examples/flex_attn.ipynb / attn_gym/masks/document_mask.py (MIT), reproduced:
def _offsets_to_doc_ids_tensor(offsets):
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=offsets.device, dtype=torch.int32), counts)


def generate_doc_mask_mod(mask_mod, offsets):
    document_id = _offsets_to_doc_ids_tensor(offsets)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        same_doc = document_id[q_idx] == document_id[kv_idx]
        q_logical = q_idx - offsets[document_id[q_idx]]
        kv_logical = kv_idx - offsets[document_id[kv_idx]]
        inner_mask = mask_mod(b, h, q_logical, kv_logical)
        return same_doc & inner_mask

    return doc_mask_mod


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _baseline_mb() -> float:
    """The resident memory now, with the peak reset to it (Linux: ``clear_refs``), so a later peak is this call's.

    Without a resettable peak the baseline is the peak so far (a later peak below it reads as 0).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        now = _status_mb("VmRSS")
        if now is not None:
            return now
    except OSError:
        pass
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _allocated_mb(fn) -> float:
    """Bytes torch allocates during ``fn()`` (every allocation, freed or not: a bound on its peak)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events()) / 2**20


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def child(kind: str, length: int, repeat: int) -> dict:
    """One measurement in this (fresh) process: time and peak RSS above the baseline."""
    sizes = lengths(length, DOCS.get(length, max(1, length // 256)))
    doc = patterndsl.segments(sizes)[None]
    if kind in ("plan", "plan-packed"):
        p = patterndsl.compile(SOURCE) if kind == "plan" else patterndsl.load(PACKED)
        from patterndsl.runtime import plans

        # The sizes' static plan, cached by the runtime once per shape (not the call-time plan measured).
        plans.get(plans.register(p.ir, (128, 128), "auto"), length, length, HEADS)
        small = patterndsl.segments(lengths(1024, 8))[None]
        p.plan(1024, 1024, HEADS, doc=small)  # warm-up: lazy imports
        base = _baseline_mb()
        ms = _median_ms(lambda: p.plan(length, length, HEADS, doc=doc), repeat)
        # Process CPU time as well: on a loaded machine the wall time mostly measures waiting.
        cpu = time.process_time()
        for _ in range(repeat):
            plan = p.plan(length, length, HEADS, doc=doc)
        cpu_ms = (time.process_time() - cpu) / repeat * 1e3 / torch.get_num_threads()
        extra = {"elements": plan.work.get("elements_evaluated", 0), "boxes": plan.work.get("boxes", 0)}
        extra["cpu_ms"] = cpu_ms
        mb = max(_peak_rss_mb() - base, 0.0)  # before the profiler's own memory
        extra["allocated_mb"] = _allocated_mb(lambda: p.plan(length, length, HEADS, doc=doc))
        return {"ms": ms, "mb": mb, **extra}
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = generate_doc_mask_mod(causal_mask, offsets_of(sizes))
    create_block_mask(mask_mod, None, None, 1024, 1024, device="cpu")
    base = _baseline_mb()
    ms = _median_ms(lambda: create_block_mask(mask_mod, None, None, length, length, device="cpu"), repeat)
    return {"ms": ms, "mb": max(_peak_rss_mb() - base, 0.0)}


def measure(kind: str, length: int, repeat: int, threads: int, timeout: float = 900.0) -> dict | None:
    cmd = [sys.executable, __file__, "--child", kind, str(length), str(repeat), "--threads", str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return {"error": tail[:160]}
    # The last JSON line: the profiler may print its own lines after it.
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def attention_times(length: int, repeat: int, flex: bool) -> dict:
    sizes = lengths(length, DOCS[length])
    doc = patterndsl.segments(sizes)[None]
    p = patterndsl.compile(SOURCE)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, DIM, generator=g) for _ in range(3))
    out = {}
    out["forward"] = _median_ms(lambda: p(q, k, v, doc=doc), repeat)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def fwd_bwd():
        p(qg, kg, vg, doc=doc).sum().backward()

    out["forward+backward"] = _median_ms(fwd_bwd, repeat)

    def sdpa():
        start = 0
        for n in sizes:
            sl = slice(start, start + n)
            torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True)
            start += n

    out["sdpa per document"] = _median_ms(sdpa, repeat)
    ref = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, a : a + n], k[:, :, a : a + n], v[:, :, a : a + n], is_causal=True
            )
            for a, n in zip(offsets_of(sizes)[:-1].tolist(), sizes, strict=True)
        ],
        dim=2,
    )
    out["max |ours - sdpa|"] = float((p(q, k, v, doc=doc) - ref).abs().max())
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(
            generate_doc_mask_mod(causal_mask, offsets_of(sizes)), None, None, length, length, device="cpu"
        )
        compiled = torch.compile(flex_attention)
        compiled(q, k, v, block_mask=block_mask)
        out["flex forward"] = _median_ms(lambda: compiled(q, k, v, block_mask=block_mask), repeat)

        def flex_fwd_bwd():
            compiled(qg, kg, vg, block_mask=block_mask).sum().backward()

        try:
            out["flex forward+backward"] = _median_ms(flex_fwd_bwd, repeat)
        except NotImplementedError as err:  # FlexAttention has no backward on CPU (torch 2.x)
            print(f"  flex forward+backward not measured: {str(err).splitlines()[0]}")
    return out


def _fmt(m: dict | None) -> str:
    if m is None:
        return "not measured"
    if "error" in m:
        return f"failed: {m['error']}"
    return f"{m['ms']:9.2f} ms, peak {m['mb']:8.1f} MB above baseline"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _total_memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="16384,131072")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    ap.add_argument("--flex-128k", action="store_true", help="also attempt create_block_mask beyond 16K")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--child", nargs=3, metavar=("KIND", "LENGTH", "REPEAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        kind, length, repeat = args.child
        print(json.dumps(child(kind, int(length), int(repeat))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"packed causal documents, B=1 H={HEADS} D={DIM} float32, {args.threads} threads (timings provisional)")
    misses = []
    plan_ms = {}
    flex_mask = {}
    for length in sizes:
        ours = measure("plan", length, args.repeat, args.threads)
        print(f"\nL={length:,} ({DOCS.get(length, length // 256)} documents)")
        print(f"  call-time plan        {_fmt(ours)}  ({ours.get('boxes', 0)} boxes, "
              f"{ours.get('elements', 0)} elements evaluated, {ours.get('cpu_ms', float('nan')):.2f} ms "
              f"process CPU time per thread, {ours.get('allocated_mb', float('nan')):.1f} MB allocated by "
              "torch in all)")  # fmt: skip
        plan_ms[length] = ours.get("ms")
        packed = measure("plan-packed", length, args.repeat, args.threads)
        print(f"  plan, packed_documents.pdsl (window + sinks per document) {_fmt(packed)}")
        if not args.no_flex and (length <= 16 * 1024 or args.flex_128k):
            flex_mask[length] = measure("flex", length, args.repeat, args.threads)
            print(f"  create_block_mask     {_fmt(flex_mask[length])}")
            fm = flex_mask[length]
            if "ms" in fm and "ms" in ours:
                print(f"  plan / create_block_mask time: {ours['ms'] / fm['ms']:.4f}x")
        elif not args.no_flex:
            # create_block_mask's memory grows with Lq x Lk: scale its measured peak at the shortest length.
            seen = [(n, m) for n, m in flex_mask.items() if "mb" in m]
            need = seen[0][1]["mb"] / 1024 * (length / seen[0][0]) ** 2 if seen else length * length / 2**30
            fits = "fits" if need < _total_memory_gb() else "does not fit"
            print(f"  create_block_mask     not attempted (--flex-128k): about {need:.0f} GiB at this length "
                  f"(Lq x Lk from its peak at {seen[0][0] if seen else length:,}), this machine has "
                  f"{_total_memory_gb():.0f} GiB: {fits}")  # fmt: skip
        if length >= 128 * 1024 and "ms" in ours:
            ok = ours["ms"] < TARGET_PLAN_MS and max(ours["mb"], ours.get("allocated_mb", 0.0)) < TARGET_PLAN_MB
            print(f"  target plan < {TARGET_PLAN_MS:g} ms and < {TARGET_PLAN_MB:g} MB: {_met(ok)}")
            if not ok:
                misses.append(f"plan at {length}: {ours['ms']:.2f} ms, {ours['mb']:.1f} MB")
    if 16 * 1024 in sizes:
        length = 16 * 1024
        times = attention_times(length, args.repeat, not args.no_flex)
        print(f"\nattention at L={length:,}")
        for name, value in times.items():
            print(f"  {name:22s} {value:10.3f}" + ("" if name.startswith("max") else " ms"))
        fl = flex_mask.get(length)
        if "flex forward" in times and fl and "ms" in fl and plan_ms.get(length):
            both = (plan_ms[length] + times["forward"]) / (fl["ms"] + times["flex forward"])
            alone = times["forward"] / times["flex forward"]
            target = f"(target <= {TARGET_PLAN_FORWARD})"
            print(f"  (plan + forward) / (create_block_mask + flex forward): {both:.3f}x {target}: "
                  f"{_met(both <= TARGET_PLAN_FORWARD)}")  # fmt: skip
            met = _met(alone <= TARGET_FORWARD)
            print(f"  forward / flex forward: {alone:.3f}x (target <= {TARGET_FORWARD}): {met}")
            if "flex forward+backward" in times:
                ratio = times["forward+backward"] / times["flex forward+backward"]
                print(f"  forward+backward / flex forward+backward: {ratio:.3f}x (no target)")
            if both > TARGET_PLAN_FORWARD:
                misses.append(f"plan + forward at 16K: {both:.3f}x")
            if alone > TARGET_FORWARD:
                misses.append(f"forward at 16K: {alone:.3f}x")
        print(f"  forward / sdpa per document: {times['forward'] / times['sdpa per document']:.3f}x")
    print("\nmisses: " + ("; ".join(misses) if misses else "none"))


if __name__ == "__main__":
    main()
