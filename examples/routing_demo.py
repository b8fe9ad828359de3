"""Content-based sparsity on CPU: MoBA, NSA-style selection, landmark retrieval, BiFormer, Routing Transformer.

Shows ``route(...)`` end to end with the bundled examples (moba.pdsl, nsa.pdsl,
landmark.pdsl, biformer.pdsl): the choice is made from the data at every call,
merged with each pattern's static plan and run by the CPU path with gradients.
For each example the script prints the plan's tiles (run-time tiles as 3), the
share of key/query pairs the data chose, checks the output and gradients against
dense float64 attention over ``Pattern.mask(..., q=, k=)``, and times the call.
NSA's two branches run as two patterns mixed by gates, as in the paper.
The Routing Transformer (routing_transformer.pdsl) labels tokens by their nearest
centroid at every call; the script prints the block efficiency of the clustered
heads with tokens sorted by label against the original order, checks the result
and takes one exponential-moving-average step of the centroids.

Run: ``python examples/routing_demo.py`` (a few seconds; sizes are small on purpose).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import patterndsl

HERE = Path(__file__).resolve().parent


def dense_reference(q, k, v, mask):
    """Float64 softmax attention over a ``[B, H, Lq, Lk]`` mask; rows with no key give 0."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p @ v


def run(title: str, pattern, q, k, v) -> torch.Tensor:
    """Forward + backward of one routed pattern, checked against the dense reference."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    t0 = time.perf_counter()
    out = pattern(q, k, v)
    out.square().sum().backward()
    seconds = time.perf_counter() - t0
    mask = pattern.mask(q.shape[2], k.shape[2], q.shape[1], q=q, k=k)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, mask)
    ref.square().sum().backward()
    err = max(
        float((out.detach().double() - ref.detach()).abs().max()),
        *(float((a.grad.double() - b.grad).abs().max()) for a, b in ((q, q64), (k, k64), (v, v64))),
    )
    tiles = pattern.plan(q.shape[2], k.shape[2], q.shape[1], block=(64, 64), order="identity").tiles()
    counts = {s: int((tiles == s).sum()) for s in range(4)}
    print(
        f"{title:44s} density {float(mask.float().mean()):6.3f}  tiles empty/partial/full/run-time "
        f"{counts[0]}/{counts[1]}/{counts[2]}/{counts[3]}  max err {err:.1e}  fwd+bwd {seconds * 1e3:7.1f} ms"
    )
    assert err < 1e-3, f"{title}: mismatch {err}"
    return out


def main() -> None:
    torch.manual_seed(0)
    L, D = 1024, 32

    def qkv(heads, kv_heads, length=L):
        return (
            torch.randn(1, heads, length, D),
            torch.randn(1, kv_heads, length, D),
            torch.randn(1, kv_heads, length, D),
        )

    moba = patterndsl.load(HERE / "moba.pdsl", block=128, topk=2)
    run("MoBA (block 128, top-2, per token)", moba, *qkv(4, 4))

    # NSA: selection shared by each GQA group (4 query heads per kv head), window branch, gates.
    select = patterndsl.load(HERE / "nsa.pdsl", name="nsa_select", block=32, topk=8)
    window = patterndsl.load(HERE / "nsa.pdsl", name="nsa_window", span=128)
    q, k, v = qkv(8, 2)
    o_sel = run("NSA selection (block 32, 8 blocks, GQA 8/2)", select, q, k, v)
    o_win = window(q, k, v)
    gates = torch.sigmoid(torch.randn(1, 8, L, 2))
    mixed = gates[..., :1] * o_sel + gates[..., 1:] * o_win
    print(f"{'NSA gated mix of the two branches':44s} output {tuple(mixed.shape)}")

    landmark = patterndsl.load(HERE / "landmark.pdsl", block=64, topk=4)
    run("Landmark retrieval (block 64, top-4)", landmark, *qkv(4, 4))

    # BiFormer on a 32 x 32 image: 8 x 8 regions, each region of queries picks 4 key regions.
    biformer = patterndsl.load(HERE / "biformer.pdsl", H=32, W=32, r=8, topk=4)
    run("BiFormer regions (32x32 grid, 8x8, top-4)", biformer, *qkv(4, 4))

    routing_transformer()


def routing_transformer(L: int = 1024, D: int = 32, n: int = 16, heads: int = 8) -> None:
    """Half the heads local, half clustered: block efficiency sorted vs original order, then a centroid step."""
    from patterndsl.analysis import clusterplan

    pattern = patterndsl.load(HERE / "routing_transformer.pdsl", nheads=heads, span=63, n=n)
    # Tokens near a few directions, so clusters mean something; centroids start at random tokens.
    directions = torch.nn.functional.normalize(torch.randn(n, D), dim=-1)
    topic = torch.randint(0, n, (1, heads, L))
    q = directions[topic] * 4 + torch.randn(1, heads, L, D)
    k = directions[torch.randint(0, n, (1, heads, L))] * 4 + torch.randn(1, heads, L, D)
    v = torch.randn(1, heads, L, D)
    centroids = q[0, :, torch.randperm(L)[:n]].clone()  # [heads, n, D]
    lab = patterndsl.cluster_labels(pattern, q, k, centroids=centroids)
    half = slice(heads // 2, heads)
    ql, kl = lab.q[:, half].reshape(-1, L), lab.k[:, half].reshape(-1, L)
    block = (64, 64)
    ordered = clusterplan.sorted_plan(ql, kl, False, block).stats()
    original = clusterplan.unsorted_efficiency(ql, kl, block)
    print(
        f"{'Routing Transformer clusters (' + str(n) + ' centroids)':44s} block efficiency sorted "
        f"{ordered['efficiency']:.3f} vs original order {original['efficiency']:.3f} "
        f"({ordered['efficiency'] / original['efficiency']:.1f}x)"
    )
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    t0 = time.perf_counter()
    out = pattern(q, k, v, centroids=centroids)
    out.square().sum().backward()
    seconds = time.perf_counter() - t0
    mask = pattern.mask(L, L, heads, q=q, k=k, centroids=centroids)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, mask)
    ref.square().sum().backward()
    err = max(
        float((out.detach().double() - ref.detach()).abs().max()),
        *(float((a.grad.double() - b.grad).abs().max()) for a, b in ((q, q64), (k, k64), (v, v64))),
    )
    print(f"{'Routing Transformer attention':44s} max err {err:.1e}  fwd+bwd {seconds * 1e3:7.1f} ms")
    assert err < 1e-3, f"Routing Transformer: mismatch {err}"
    moved = patterndsl.update_centroids(centroids, q.detach()[:, :], lab.q, decay=0.9)
    shift = float((moved - centroids).norm(dim=-1).mean())
    print(f"{'update_centroids (EMA, decay 0.9)':44s} mean centroid shift {shift:.3f}")


if __name__ == "__main__":
    main()
