"""Run-time inputs in the language (LANGUAGE.md section 7): grammar, check, IR, printer, warnings, dense meaning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import patterndsl as pd
from patterndsl import check, ir
from patterndsl.errors import InputError, PatternError, PatternNameError, PatternTypeError, PatternValueError
from patterndsl.grammar import parse

HEAD = """pattern p(w = 3) {
    input doc: int[batch, token]
    input tag: int[batch, token]
    input prefix: int[batch]
    input rel: float[head, 2 * w, w]
    input table: int[5]
"""


def src(body: str) -> str:
    return HEAD + "    " + body + "\n}\n"


def test_declarations_bind_with_dims_and_kinds():
    pir = pd.compile(src("within(doc, causal)")).ir
    assert [d.name for d in pir.inputs] == ["doc", "tag", "prefix", "rel", "table"]
    assert pir.input("rel") == ir.InputDecl("rel", "float", ("head", 6, 3))
    assert pir.input("doc").batched and pir.input("doc").index_dims == ("token",)
    assert not pir.input("table").batched and pir.input("table").index_dims == (5,)


def test_input_references_build_input_ref_nodes():
    node = pd.compile(src("where(tag[q] == 1 or k < prefix or table[h + 1] == 2)")).ir.default
    refs = {e for e in ir.walk_expr(node.arg("pred")) if isinstance(e, ir.InputRef)}
    assert refs == {
        ir.InputRef("tag", (ir.Var("q"),)),
        ir.InputRef("prefix", ()),
        ir.InputRef("table", (ir.Arith("+", ir.Var("h"), ir.Const(1)),)),
    }
    assert ir.reads_inputs(node)


@pytest.mark.parametrize(
    "body",
    [
        "within(doc, causal & (window(w) | sink(4)))",
        "causal | where(k < prefix)",
        "window(w, w) | where(tag[q] == 1 or tag[k] == 1)",
        "where(table[q - k] >= 1) & causal",
        "within(doc, blocks(2) - sink(1)) | where(not (tag[k] != 0))",
    ],
)
def test_printer_round_trips(body):
    p = pd.compile(src(body))
    again = pd.compile(str(p))
    assert again.ir == p.ir
    assert again.ir.inputs == p.ir.inputs


@pytest.mark.parametrize(
    ("body", "error", "text", "caret"),
    [
        ("where(dox[q] == 1)", PatternNameError, "unknown input 'dox' (did you mean 'doc'?)", "dox"),
        ("where(doc[q + 1] == 1)", PatternTypeError, "indexed by a position, q or k", "q + 1"),
        ("where(rel[0, 0, 0] > 0)", PatternTypeError, "indexed by h", "0"),
        ("where(rel[h, 0, 0] > 0)", PatternTypeError, "float input 'rel'", "rel[h, 0, 0]"),
        ("where(tag == 1)", PatternTypeError, "index it as tag[q]", "tag"),
        ("where(prefix[q] == 1)", PatternTypeError, "takes 0 indices", "prefix[q]"),
        ("where(doc[q, k] == 1)", PatternTypeError, "takes 1 index", "doc[q, k]"),
        ("within(prefix, causal)", PatternTypeError, "int[batch, token] or int[token]", "prefix"),
        ("within(dco, causal)", PatternTypeError, "did you mean 'doc'", "dco"),
        ("within(doc, within(doc, causal))", PatternValueError, "cannot contain within", "within(doc, causal)"),
        ("within(doc, random(1, 2))", PatternValueError, "cannot contain random", "random(1, 2)"),
        ("within(doc, where(tag[k] == 1))", PatternValueError, "cannot read input 'tag'", "tag[k]"),
        ("within(doc, route(1, 4))", PatternValueError, "static pattern", "route(1, 4)"),
        ("sink(prefix)", PatternTypeError, "only usable inside where", "prefix"),
        ("where(w[q] == 1)", PatternTypeError, "'w' is not an input", "w"),
        (
            "causal | route(1, 4, among = where(tag[k] == 1))",
            PatternValueError,
            "among cannot read run-time inputs",
            "where(tag[k] == 1)",
        ),
    ],
)
def test_located_errors(body, error, text, caret):
    assert_located(src(body), error, text, caret)


def assert_located(source: str, error: type, text: str, caret: str) -> None:
    """Compiling ``source`` raises ``error`` saying ``text`` with its caret under ``caret``."""
    with pytest.raises(error) as info:
        pd.compile(source)
    err = info.value
    assert text in err.message
    line = source.splitlines()[err.span.line - 1]
    assert line[err.span.column - 1 : err.span.end_column - 1] == caret


@pytest.mark.parametrize(
    ("decls", "text", "caret"),
    [
        ("input doc: int[batch, token]\n    input doc: int[token]", "declared twice", "doc"),
        ("input doc: int[token, batch]", "'batch' may only be the first", "batch"),
        ("input doc: integer[token]", "int[...] or float[...]", "integer"),
        ("input doc: int[tokens]", "unknown dimension 'tokens' (did you mean 'token'?)", "tokens"),
        ("input doc: int[0]", "extent must be >= 1", "0"),
        ("input doc: int[token, token]", "at most one 'token'", "token"),
    ],
)
def test_declaration_errors(decls, text, caret):
    assert_located(f"pattern p {{\n    {decls}\n    causal\n}}\n", PatternError, text, caret)


def test_statement_ends_at_line_break_outside_brackets():
    source = "pattern p {\n    input t: int[\n        token]\n    where(t[\n    k] == 1)\n}\n"
    assert pd.compile(source).ir.input("t").dims == ("token",)


def test_check_warns_where_an_index_is_not_provably_in_range():
    source = """pattern g(win = 2) {
    layout grid(y = 4, x = 4)
    input rel: int[2 * win - 1]
    input t: int[5]
    where(rel[q.y - k.y + win - 1] > 0 or t[q - k] == 1 or t[2] == 0 or rel[min(q.x, 2)] == 1)
}
"""
    warnings: list[str] = []
    assert check.check_module(parse(source, "g.pdsl"), source, "g.pdsl", warnings) == []
    assert len(warnings) == 2
    assert all("warning: cannot prove" in w for w in warnings)
    assert "'q.y - k.y + 2 - 1'" in warnings[0] or "q.y - k.y" in warnings[0]
    assert "'q - k'" in warnings[1]


def test_cli_check_prints_warnings(tmp_path, capsys):
    from patterndsl import cli

    path = tmp_path / "t.pdsl"
    path.write_text("pattern p {\n    input t: int[4]\n    where(t[q] == 1)\n}\n")
    assert cli.main(["check", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{path}:3:13: warning: cannot prove that index 'q' of input 't'" in err


def test_segments_helper_from_lengths_and_cu_seqlens():
    ids = pd.segments([3, 1, 2])
    assert ids.tolist() == [0, 0, 0, 1, 2, 2]
    assert torch.equal(pd.segments(torch.tensor([0, 3, 4, 6], dtype=torch.int32)), ids)
    for bad in ([3, 0], torch.tensor([1, 3]), torch.tensor([0, 3, 2]), "12", [1.5]):
        with pytest.raises(PatternError):
            pd.segments(bad)


PACKED = """pattern packed(w = 2) {
    input doc: int[batch, token]
    within(doc, causal & (window(w) | sink(1)))
}"""


def test_within_meaning_uses_each_segment_coordinates():
    p = pd.compile(PACKED)
    doc = torch.tensor([5, 5, 5, 5, 7, 7, 5, 5])  # the two runs of 5 are different segments
    m = p.mask(8, 8, 1, doc=doc)[0, 0]
    starts = [0, 0, 0, 0, 4, 4, 6, 6]
    for i in range(8):
        for j in range(8):
            same = starts[i] == starts[j]
            qs, ks = i - starts[i], j - starts[j]
            want = same and ks <= qs and (qs - ks <= 2 or ks < 1)
            assert bool(m[i, j]) == want, (i, j)


def test_mask_end_aligned_and_batched_inputs():
    p = pd.compile("pattern p {\n input prefix: int[batch]\n causal | where(k < prefix)\n}")
    m = p.mask(3, 6, 2, prefix=torch.tensor([0, 5]))
    assert m.shape == (2, 2, 3, 6)
    i = torch.arange(3)[:, None] + 3
    j = torch.arange(6)[None, :]
    assert torch.equal(m[0, 0], j <= i)
    assert torch.equal(m[1, 1], (j <= i) | (j < 5))


def test_mask_clamps_table_indices():
    p = pd.compile("pattern p {\n input t: int[3]\n where(t[q - k] == 1)\n}")
    m = p.mask(4, 4, 1, t=torch.tensor([0, 0, 1]))[0, 0]
    d = torch.arange(4)[:, None] - torch.arange(4)[None, :]
    assert torch.equal(m, d >= 2)


@pytest.mark.parametrize(
    ("given", "text"),
    [
        ({}, "needs input 'doc'"),
        ({"doc": torch.zeros(8, dtype=torch.int64), "tag": torch.zeros(8)}, "has no input 'tag'"),
        ({"doc": torch.zeros(8)}, "must be an integer tensor"),
        ({"doc": torch.zeros(7, dtype=torch.int64)}, "has shape [7], expected [batch, 8] or [8]"),
        ({"doc": torch.zeros(2, 3, 8, dtype=torch.int64)}, "has shape [2, 3, 8]"),
        ({"doc": [0] * 8}, "must be a torch.Tensor"),
    ],
)
def test_mask_refuses_bad_inputs(given, text):
    p = pd.compile(PACKED)
    with pytest.raises(InputError) as info:
        p.mask(8, 8, 1, **given)
    assert text in str(info.value)
    assert "doc" in str(info.value) or "tag" in str(info.value)


def test_cli_show_plan_and_plot_take_inputs(tmp_path, capsys):
    from patterndsl import cli

    examples = Path(__file__).resolve().parents[2] / "examples"
    packed = str(examples / "packed_documents.pdsl")
    args = ["show", packed, "--param", "w=16", "--seq", "64", "--block", "8x8", "--stage", "plan", "--ascii"]
    assert cli.main([*args, "--input", "doc=lengths:30,10,24"]) == 0
    text = capsys.readouterr().out
    p = pd.load(packed, w=16)
    doc = pd.segments([30, 10, 24])
    want = int(p.mask(64, 64, 1, doc=doc).sum())
    assert f"({want:,} of 4,096 pairs allowed)" in text
    assert "?" not in text.split("'.' partial")[0]  # every tile decided for this data
    tagged = str(examples / "longformer_tagged.pdsl")
    out = tmp_path / "t.png"
    base = ["plot", tagged, "--param", "w=2", "--seq", "32", "--block", "8x8", "-o", str(out)]
    assert cli.main([*base, "--input", "tag=positions:0,17"]) == 0
    assert out.stat().st_size > 0
    assert cli.main([*args, "--input", "doc=lengths:30,10"]) != 0
    assert "add up to the key length 64" in capsys.readouterr().err


def test_examples_with_inputs_mean_what_their_headers_say():
    examples = Path(__file__).resolve().parents[2] / "examples"
    p = pd.load(examples / "prefix_lm_per_example.pdsl")
    m = p.mask(6, 6, 1, prefix=torch.tensor([2, 0]))
    assert m[0, 0, 0].tolist() == [True, True, False, False, False, False]
    assert m[1, 0, 0].tolist() == [True, False, False, False, False, False]
    t = pd.load(examples / "longformer_tagged.pdsl", w=1)
    tag = torch.zeros(8, dtype=torch.int64)
    tag[5] = 1
    m = t.mask(8, 8, 1, tag=tag)[0, 0]
    assert bool(m[5].all()) and bool(m[:, 5].all()) and not bool(m[0, 3])
    d = pd.load(examples / "packed_documents.pdsl", w=2, sinks=1)
    m = d.mask(8, 8, 1, doc=pd.segments([3, 5]))[0, 0]
    assert m[7].tolist() == [False, False, False, True, False, True, True, True]
