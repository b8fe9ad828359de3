"""The bundled examples: each checks, compiles with its defaults, and means what its header says.

The spot facts below are written from the papers' definitions (quoted in each
example's header), independently of patterndsl's semantics module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import patterndsl
from patterndsl import cli, grammar

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.glob("*.pdsl"))


def _pattern_names(path: Path) -> list[str]:
    return [p.name for p in grammar.parse(path.read_text(), str(path)).patterns]


def _qk(L: int):
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    return q, k


def test_every_required_example_is_there():
    names = {p.stem for p in FILES}
    assert {
        "streaming_llm",
        "longformer",
        "bigbird",
        "sparse_transformer",
        "prefix_lm",
        "chunked_local",
        "halonet",
        "image_neighborhood_2d",
        "video_neighborhood_3d",
        "s2_attention",
        "moba",
        "landmark",
        "gemma2",
        "alibi",
        "t5_buckets",
        "swin_relative_bias",
    } <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_checks_and_cites_its_source(path, capsys):
    assert cli.main(["check", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    header = path.read_text().splitlines()[0]
    assert header.startswith("# "), "every example starts with a header comment"
    assert "Reproduces" in path.read_text()


@pytest.mark.parametrize(
    "path, name", [(p, n) for p in FILES for n in _pattern_names(p)], ids=lambda x: getattr(x, "name", x)
)
def test_example_compiles_with_defaults(path, name):
    pattern = patterndsl.load(path, name=name)
    assert pattern.name == name
    # The printed IR re-compiles to the same pattern.
    assert patterndsl.compile(str(pattern)) == pattern


def _mask(file: str, name: str | None = None, L: int = 32, heads: int = 1, **params) -> torch.Tensor:
    return patterndsl.load(EXAMPLES / file, name=name, **params).mask(L, L, heads)


def test_streaming_sees_sinks_and_last_span_plus_one():
    span, sinks, L = 5, 2, 40
    m = _mask("streaming_llm.pdsl", L=L, span=span, sinks=sinks)[0]
    for q in range(L):
        expected = {k for k in range(L) if k <= q and (k < sinks or k >= q - span)}
        assert set(torch.nonzero(m[q]).flatten().tolist()) == expected
    assert int(m[L - 1].sum()) == sinks + span + 1


def test_longformer_local_and_dilated_heads():
    L, half, d, g = 40, 3, 2, 2
    m = _mask("longformer.pdsl", L=L, heads=2, half=half, dilation=d, n_global=g, local_heads=1)
    q, k = _qk(L)
    glob = (q < g) | (k < g)
    assert torch.equal(m[0], glob | ((q - k).abs() <= half))
    assert torch.equal(m[1], glob | (((q - k).abs() <= half * d) & ((q - k) % d == 0)))


def test_bigbird_blocks_window_global_random():
    L, b, n_random = 48, 4, 2
    m = _mask("bigbird.pdsl", L=L, block=b, w=1, n_global=1, n_random=n_random)[0]
    blocks = m.reshape(L // b, b, L // b, b)
    # Block sparse: every b x b block is all allowed or all not.
    assert torch.equal(blocks.all(3).all(1), blocks.any(3).any(1))
    tiles = blocks.any(3).any(1)
    n = L // b
    for i in range(n):
        window = {j for j in range(n) if abs(i - j) <= 1}
        if i == 0:
            assert tiles[i].all()  # the global block attends to everything
            continue
        chosen = set(torch.nonzero(tiles[i]).flatten().tolist())
        assert window | {0} <= chosen
        assert len(chosen - window - {0}) <= n_random
    assert tiles[:, 0].all()
    # Deterministic: the same source and seed give the same random blocks.
    assert torch.equal(m, _mask("bigbird.pdsl", L=L, block=b, w=1, n_global=1, n_random=n_random)[0])


def test_sparse_transformer_strided_and_fixed():
    L, stride, c = 32, 4, 1
    q, k = _qk(L)
    strided = _mask("sparse_transformer.pdsl", "sparse_strided", L=L, stride=stride)[0]
    assert torch.equal(strided, (k <= q) & ((q - k <= stride) | ((q - k) % stride == 0)))
    fixed = _mask("sparse_transformer.pdsl", "sparse_fixed", L=L, stride=stride, c=c)[0]
    assert torch.equal(fixed, (k <= q) & ((q // stride == k // stride) | (k % stride >= stride - c)))


def test_prefix_lm():
    L, P = 16, 5
    q, k = _qk(L)
    m = _mask("prefix_lm.pdsl", L=L, prefix=P)[0]
    assert torch.equal(m, (k <= q) | ((q < P) & (k < P)))
    assert m[0, P - 1] and not m[0, P]


def test_chunked_and_blocked_local():
    L, chunk = 24, 4
    q, k = _qk(L)
    same = q // chunk == k // chunk
    assert torch.equal(_mask("chunked_local.pdsl", "chunked_local", L=L, chunk=chunk)[0], same & (k <= q))
    assert torch.equal(_mask("chunked_local.pdsl", "blocked_local", L=L, chunk=chunk)[0], same)


def test_halonet_block_plus_halo():
    H, W, b, halo = 8, 12, 4, 1
    m = _mask("halonet.pdsl", L=H * W, H=H, W=W, b=b, halo=halo)[0]
    for qi in range(H * W):
        qy, qx = divmod(qi, W)
        y0, x0 = qy // b * b, qx // b * b
        expected = {
            ky * W + kx
            for ky in range(max(0, y0 - halo), min(H, y0 + b + halo))
            for kx in range(max(0, x0 - halo), min(W, x0 + b + halo))
        }
        assert set(torch.nonzero(m[qi]).flatten().tolist()) == expected


def test_image_neighborhood_sees_a_shifted_box():
    H, W, size = 6, 7, 3
    m = _mask("image_neighborhood_2d.pdsl", L=H * W, H=H, W=W, size=size)[0]
    assert (m.sum(1) == size * size).all()  # never truncated at the border
    for qi in range(H * W):
        qy, qx = divmod(qi, W)
        cy, cx = min(max(qy, 1), H - 2), min(max(qx, 1), W - 2)  # shifted inward
        expected = {ky * W + kx for ky in range(cy - 1, cy + 2) for kx in range(cx - 1, cx + 2)}
        assert set(torch.nonzero(m[qi]).flatten().tolist()) == expected


def test_video_neighborhood_is_causal_in_time():
    T, H, W, time, size = 3, 5, 5, 2, 3
    m = _mask("video_neighborhood_3d.pdsl", L=T * H * W, T=T, H=H, W=W, time=time, size=size)[0]
    frame = torch.arange(T * H * W) // (H * W)
    for qi in range(T * H * W):
        t, rest = divmod(qi, H * W)
        y, x = divmod(rest, W)
        cy, cx = min(max(y, 1), H - 2), min(max(x, 1), W - 2)
        frames = range(max(0, t - time + 1), t + 1)
        box = [(ky, kx) for ky in range(cy - 1, cy + 2) for kx in range(cx - 1, cx + 2)]
        expected = {f * H * W + ky * W + kx for f in frames for ky, kx in box}
        got = torch.nonzero(m[qi]).flatten()
        assert set(got.tolist()) == expected
        assert (frame[got] <= t).all()


def test_s2_heads_shard_the_context():
    L, local = 24, 3
    m = _mask("s2_attention.pdsl", L=L, heads=5, local=local)
    q, k = _qk(L)
    causal = k <= q
    for h in range(4):
        assert torch.equal(m[h], causal & ((q - k <= local) | (k % 4 == h)))
    assert torch.equal(m[4], causal)
    # Together the sharded heads cover every causal pair.
    assert torch.equal(m[:4].any(0), causal)


def _routed(file: str, L: int, heads: int = 1, **params):
    pattern = patterndsl.load(EXAMPLES / file, **params)
    gen = torch.Generator().manual_seed(1)
    qt = torch.randn(1, heads, L, 16, generator=gen)
    kt = torch.randn(1, heads, L, 16, generator=gen)
    return pattern.mask(L, L, heads, q=qt, k=kt)[0, 0]


def test_moba_own_block_plus_topk_earlier_blocks():
    L, block, topk = 64, 8, 2
    m = _routed("moba.pdsl", L, block=block, topk=topk)
    q, k = _qk(L)
    own = (q // block == k // block) & (k <= q)
    assert not (m & (k > q)).any()
    assert torch.equal(m & own, own)
    for qi in range(L):
        extra = {int(j) // block for j in torch.nonzero(m[qi] & ~own[qi]).flatten()}
        assert len(extra) == min(topk, qi // block)
        for b in extra:  # a chosen earlier block is attended whole
            assert m[qi, b * block : (b + 1) * block].all()


def test_landmark_window_plus_retrieved_blocks():
    L, block, topk = 64, 8, 2
    m = _routed("landmark.pdsl", L, block=block, topk=topk)
    q, k = _qk(L)
    local = (k <= q) & (q - k <= block - 1)
    assert not (m & (k > q)).any()
    assert torch.equal(m & local, local)
    for qi in range(L):
        extra = {int(j) // block for j in torch.nonzero(m[qi] & ~local[qi]).flatten()}
        assert len(extra) <= topk


def test_biformer_regions():
    H, W, r, topk = 8, 8, 4, 2
    m = _routed("biformer.pdsl", H * W, H=H, W=W, r=r, topk=topk)
    region = (torch.arange(H * W) // W // r) * (W // r) + (torch.arange(H * W) % W) // r
    assert (m.sum(1) == topk * r * r).all()
    for qi in range(H * W):
        keys = torch.nonzero(m[qi]).flatten()
        assert len(set(region[keys].tolist())) == topk
        # Every query of a region shares the region's choice.
        assert torch.equal(m[qi], m[torch.nonzero(region == region[qi]).flatten()[0]])
