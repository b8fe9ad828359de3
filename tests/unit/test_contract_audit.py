"""Fixes from an audit of LANGUAGE.md sections 2, 7, 8, 10 and 11 against the code, each as written there.

Small sizes only: every test here runs in well under a second.
"""

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import PatternSyntaxError
from patterndsl.nn import Attention

SWIN = """
pattern swin(win = 2) {
    layout grid(y = 4, x = 4)
    input rel: float[head, 2 * win - 1, 2 * win - 1]
    where(q.y // win == k.y // win and q.x // win == k.x // win)
    score s + rel[h, q.y - k.y + win - 1, q.x - k.x + win - 1]
}
"""


def test_mask_needs_no_input_that_only_the_score_reads():
    # Section 7: mask() is [batch, heads, ...] "when inputs are given"; a score never changes the mask.
    p = pd.compile(SWIN)
    y, x = torch.arange(16) // 4, torch.arange(16) % 4
    block = ((y[:, None] // 2) == (y[None, :] // 2)) & ((x[:, None] // 2) == (x[None, :] // 2))
    assert torch.equal(p.mask(16, 16, 2), block.expand(2, 16, 16))
    given = p.mask(16, 16, 2, rel=torch.zeros(2, 3, 3))
    assert given.shape == (1, 2, 16, 16) and torch.equal(given[0], block.expand(2, 16, 16))


def test_mask_and_plan_take_the_inputs_the_mask_reads_without_the_score_only_ones():
    decls = "input doc: int[batch, token]\ninput b: float[head, token]\n"
    p = pd.compile("pattern p {\n" + decls + "within(doc, causal)\nscore s + b[h, k]\n}")
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 1]])
    i = torch.arange(6)
    want = torch.stack([(d[:, None] == d[None, :]) & (i[None, :] <= i[:, None]) for d in doc])[:, None].expand(
        2, 2, 6, 6
    )
    assert torch.equal(p.mask(6, 6, 2, doc=doc), want)
    assert torch.equal(p.mask(6, 6, 2, doc=doc, b=torch.zeros(2, 6)), want)
    tiles = p.plan(6, 6, 2, block=(2, 2), order="identity", doc=doc).tiles()
    assert torch.equal(tiles, p.plan(6, 6, 2, block=(2, 2), order="identity", doc=doc, b=torch.zeros(2, 6)).tiles())
    assert tiles.shape == (2, 2, 3, 3) and not bool((tiles == 3).any())
    with pytest.raises(pd.PatternError, match="needs input 'b'"):  # the call reads the score's input
        p(*(torch.randn(2, 2, 6, 4) for _ in range(3)), doc=doc)


def test_mask_still_needs_the_inputs_the_mask_reads():
    p = pd.compile(
        "pattern p {\ninput doc: int[batch, token]\ninput b: float[token]\nwithin(doc, causal)\nscore s + b[k]\n}"
    )
    with pytest.raises(pd.PatternError, match="needs input 'doc'"):
        p.mask(4)
    c = pd.compile("pattern p {\ninput C: float[2, dim]\ncluster(C)\n}")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(pd.PatternError, match="needs input 'C'"):
        c.mask(4, 4, 1, q=q, k=q)


def test_attention_module_takes_a_path_of_any_suffix(tmp_path):
    # Section 10: "pattern is a Pattern, source text or a path".
    path = tmp_path / "local.txt"
    path.write_text("pattern local(w = 1) { causal & window(w) }")
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8)
    from_path = Attention(str(path), 8, 2, w=2)
    from_text = Attention(path.read_text(), 8, 2, w=2)
    from_text.load_state_dict(from_path.state_dict())
    assert from_path.pattern == from_text.pattern
    torch.testing.assert_close(from_path(x), from_text(x))
    with pytest.raises(PatternSyntaxError):
        Attention("causal & window(2)", 8, 2)  # an expression alone is not a definition, not a path


def test_attention_module_passes_an_input_named_positions_to_the_pattern():
    # Section 10: forward(x, **inputs) passes every declared input, whatever its name.
    m = Attention("pattern p {\ninput positions: int[batch, token]\nwithin(positions, causal)\n}", 8, 2)
    docs = Attention("pattern p {\ninput doc: int[batch, token]\nwithin(doc, causal)\n}", 8, 2)
    docs.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, 8)
    ids = torch.tensor([0, 0, 1, 1, 1])
    torch.testing.assert_close(m(x, positions=ids), docs(x, doc=ids))


def test_transformers_register_takes_a_callable_of_the_layer_index_alone():
    # Section 10: "a mapping / callable from a layer (its index or its layer_type)": one argument is the index.
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from patterndsl.integrations.transformers import layer_pattern, register

    register("pdsl_audit_one_arg", lambda index: "pattern second { causal & sink(2) }" if index == 1 else None)
    register(
        "pdsl_audit_two_args", lambda index, kind: "pattern full_one { full }" if kind == "full_attention" else None
    )
    config = SimpleNamespace(sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    first, second = (layer_pattern("pdsl_audit_one_arg", config, i) for i in (0, 1))
    assert "window(" in str(first.ir.default) and second.name == "second"
    assert layer_pattern("pdsl_audit_two_args", config, 1).name == "full_one"
    assert layer_pattern("pdsl_audit_two_args", config, 0).name.startswith("sliding_")


def test_check_proves_floor_remainders_and_clamps_of_positions_in_range():
    # Section 7: `patterndsl check` warns where it cannot prove an index in range; these it can.
    from patterndsl import check
    from patterndsl.grammar import parse

    proven = "t[q % 4] == 1 and t[min(k, 3)] == 0 and t[max(min(q - k, 3), 0)] == 1 and t[(h + 1) % 2 + 2] == 1"
    unproven = "t[q % 5] == 1 or t[-(k % 4)] == 0 or t[min(q, 3)] == 1"  # q < 0 when Lq > Lk
    for body, count in ((proven, 0), (unproven, 3)):
        source = f"pattern p {{\n    input t: int[4]\n    where({body})\n}}\n"
        warnings: list[str] = []
        assert check.check_module(parse(source, "p.pdsl"), source, "p.pdsl", warnings) == []
        assert len(warnings) == count, warnings
