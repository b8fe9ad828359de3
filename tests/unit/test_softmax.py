"""The shared softmax identities: log-sum-exp merge of partial attention and the backward's delta.

Checked against softmax over the concatenated keys of the parts in float64, with empty parts,
empty rows and rows that several parts share.
"""

from __future__ import annotations

import pytest
import torch

from patterndsl.runtime import softmax


def _attend(q, k, v):
    """``(out, lse)`` of plain attention; rows with no key are 0 / -inf."""
    if k.shape[-2] == 0:
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype), torch.full(q.shape[:-1], float("-inf"))
    s = q @ k.transpose(-1, -2)
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse.to(q.dtype)


def _merged(o, lse, o_new, lse_new, rows=None):
    o, lse = o.clone(), lse.clone()
    softmax.merge_into(o, lse, o_new, lse_new, rows)
    return o, lse


def _data(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_aligned_merge_is_attention_over_both_key_sets():
    q, k, v = _data(0, 2, 5, 4), _data(1, 2, 7, 4), _data(2, 2, 7, 3)
    o1, l1 = _attend(q, k[:, :3], v[:, :3])
    o2, l2 = _attend(q, k[:, 3:], v[:, 3:])
    want_o, want_l = _attend(q, k, v)
    got_o, got_l = _merged(o1, l1, o2, l2)
    torch.testing.assert_close(got_o, want_o)
    torch.testing.assert_close(got_l, want_l)


def test_merge_with_empty_sides():
    o, lse = _data(3, 4, 2), _data(4, 4)
    empty_o, empty_l = torch.zeros(4, 2, dtype=torch.float64), torch.full((4,), float("-inf"), dtype=torch.float64)
    for got in (_merged(o, lse, empty_o, empty_l), _merged(empty_o, empty_l, o, lse)):
        torch.testing.assert_close(got[0], o)
        torch.testing.assert_close(got[1], lse)
    both = _merged(empty_o, empty_l, empty_o, empty_l)
    assert bool((both[0] == 0).all()) and bool(torch.isneginf(both[1]).all())


def test_row_merge_with_repeated_rows():
    """Parts indexed by rows (repeats allowed) merge like the union of their keys per row."""
    q, k, v = _data(5, 3, 6, 4), _data(6, 3, 12, 4), _data(7, 3, 12, 4)
    blocks = [range(0, 4), range(4, 8), range(8, 12)]
    # Block 0 is already in the buffer for rows 0..3; rows 4 and 5 start empty.
    base_o, base_l = _attend(q, k[:, :4], v[:, :4])
    base_o[:, 4:], base_l[:, 4:] = 0.0, float("-inf")
    chosen = {1: [0, 2, 4, 5], 2: [0, 2, 5]}
    rows, parts_o, parts_l = [], [], []
    for b, rs in chosen.items():
        kb, vb = k[:, blocks[b]], v[:, blocks[b]]
        o, lse = _attend(q[:, sorted(set(rs))], kb, vb)
        rows += sorted(set(rs))
        parts_o.append(o)
        parts_l.append(lse)
    got_o, got_l = _merged(base_o, base_l, torch.cat(parts_o, 1), torch.cat(parts_l, 1), torch.tensor(rows))
    for r in range(6):
        keys = [j for j in range(4) if r < 4] + [j for b, rs in chosen.items() if r in rs for j in blocks[b]]
        want_o, want_l = _attend(q[:, r : r + 1], k[:, keys], v[:, keys])
        torch.testing.assert_close(got_o[:, r : r + 1], want_o, msg=f"row {r}")
        torch.testing.assert_close(got_l[:, r : r + 1], want_l, msg=f"row {r}")


def test_row_merge_leaves_untouched_rows_and_casts_parts():
    o, lse = _data(8, 2, 5, 3).float(), _data(9, 2, 5).float()
    part_o, part_l = _data(10, 2, 1, 3), _data(11, 2, 1)
    got_o, got_l = _merged(o, lse, part_o, part_l, torch.tensor([2]))
    assert got_o.dtype == torch.float32 and got_l.dtype == torch.float32
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(got_o[:, keep], o[:, keep])
    torch.testing.assert_close(got_l[:, keep], lse[:, keep])


@pytest.mark.parametrize("with_dlse", [False, True])
def test_delta(with_dlse):
    dout, out, dlse = _data(12, 2, 3, 7, 5), _data(13, 2, 3, 7, 5), _data(14, 2, 3, 7)
    want = (dout * out).sum(-1) - (dlse if with_dlse else 0.0)
    got = softmax.delta(dout.float(), out.float(), dlse if with_dlse else None, torch.float64)
    assert got.dtype == torch.float64 and got.shape == (2, 3, 7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_delta_of_non_contiguous_inputs():
    dout, out = _data(15, 2, 7, 3, 5).transpose(1, 2), _data(16, 2, 7, 3, 5).transpose(1, 2)
    torch.testing.assert_close(softmax.delta(dout, out, dtype=torch.float64), (dout * out).sum(-1))


def test_merge_into_a_strided_view_writes_the_buffer():
    """The forward merges into views of its tiled output buffers: the merge lands in the buffer."""
    q, k, v = _data(17, 2, 8, 4), _data(18, 2, 6, 4), _data(19, 2, 6, 4)
    o1, l1 = _attend(q, k[:, :2], v[:, :2])
    o2, l2 = _attend(q, k[:, 2:], v[:, 2:])
    buf_o, buf_l = torch.zeros(2, 16, 4, dtype=torch.float64), torch.zeros(2, 16, dtype=torch.float64)
    view_o, view_l = buf_o[:, ::2], buf_l[:, ::2]
    view_o.copy_(o1)
    view_l.copy_(l1)
    softmax.merge_into(view_o, view_l, o2, l2)
    want_o, want_l = _attend(q, k, v)
    torch.testing.assert_close(buf_o[:, ::2], want_o)
    torch.testing.assert_close(buf_l[:, ::2], want_l)
    assert bool((buf_o[:, 1::2] == 0).all()) and bool((buf_l[:, 1::2] == 0).all())
