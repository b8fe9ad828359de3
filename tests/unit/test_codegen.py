"""Generated Triton source: golden files, determinism, headers and specialisation choices.

``pytest --update-golden`` rewrites ``tests/golden/*.py`` on purpose after a
deliberate change to the generator; review the diff before committing it.
Goldens hold the kernel text without its cache-key line: the key hashes the
generator's own files (:mod:`patterndsl.codegen.key`), which would make every
edit of them churn every golden.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import sympy
import torch

import patterndsl
from patterndsl.analysis.plan import HeadGroup, RunForm, plan_from_mask
from patterndsl.codegen import bounds, generator, kernel_source, key

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

# name -> (source, q_len, kv_len, heads, options)
GOLDEN_CASES = {
    "causal_forward": ("pattern causal_lm { causal }", 1024, None, 8, {}),
    "streaming_backward": (
        "pattern streaming(span = 256, sinks = 4) { causal & (window(span) | sink(sinks)) }",
        2048,
        None,
        8,
        {"kind": "backward", "kv_heads": 2, "head_dim": 128, "dtype": torch.bfloat16},
    ),
    "neighborhood_2d_forward": (
        "pattern natten { layout grid(y = 32, x = 32)\n neighborhood(7, dilation = 2) }",
        1024,
        None,
        4,
        {"head_dim": 96},
    ),
    "per_head_where_forward": (
        "pattern mix { heads 0..2: causal & where((q - k) % 3 == 0 or k < 8)\n random(2, 64, seed = 1) }",
        512,
        640,
        4,
        {"dtype": torch.float32, "head_dim": 32},
    ),
    # route(...): the same kernel family walking this call's lists, the choice read from RT.
    "moba_forward": (
        "pattern moba { causal & (blocks(256) | route(2, block = 256, qblock = 1, among = causal - blocks(256))) }",
        2048,
        None,
        8,
        {"kv_heads": 2, "dtype": torch.float32},
    ),
    "two_routes_backward": (
        "pattern r { layout grid(y = 32, x = 32)\n"
        " route(1, block = (8, 8), qblock = (8, 8)) | (route(2, block = 64, among = causal) & window(100)) }",
        1024,
        None,
        4,
        {"kind": "backward", "head_dim": 128, "dtype": torch.bfloat16, "target": "sm_80"},
    ),
    # score modifiers: a softcap (its sympy derivative in the backward) and an additive ALiBi bias.
    "softcap_local_backward": (
        "pattern gemma2_local(w = 1024, cap = 50.0) { causal & window(w)\n score cap * tanh(s / cap) }",
        2048,
        None,
        8,
        {"kind": "backward", "kv_heads": 4},
    ),
    "softcap_local_forward": (
        "pattern gemma2_local(w = 1024, cap = 50.0) { causal & window(w)\n score cap * tanh(s / cap) }",
        2048,
        None,
        8,
        {"kv_heads": 4},
    ),
    "alibi_forward": (
        "pattern alibi(n = 8) { causal\n score s - 2.0 ** (-8.0 * (h + 1) / n) * (q - k) }",
        1024,
        None,
        8,
        {"dtype": torch.float32},
    ),
    # A learned 2-D relative bias (Swin): the score reads the table's float32 bits from RT, and the dQ
    # kernel adds the table's gradient into DTAB with atomic adds.
    "swin_bias_backward": (
        "pattern swin(win = 7) {\n layout grid(y = 56, x = 56)\n input rel: float[head, 13, 13]\n"
        " where(q.y // win == k.y // win and q.x // win == k.x // win)\n"
        " score s + rel[h, q.y - k.y + win - 1, q.x - k.x + win - 1] }",
        3136,
        None,
        4,
        {"kind": "backward", "head_dim": 32, "dtype": torch.float16},
    ),
    # Run-time inputs: this call's lists; segment starts/lengths and the tags read from RT.
    "packed_documents_backward": (
        "pattern packed(w = 512) {\n input doc: int[batch, token]\n input tag: int[batch, token]\n"
        " within(doc, causal & (window(w) | sink(4))) | where(tag[q] == 1 and tag[k] == 1) }",
        2048,
        None,
        8,
        {"kind": "backward", "kv_heads": 2, "head_dim": 64, "dtype": torch.float16},
    ),
}


def without_key(text: str) -> str:
    """The kernel text without its cache-key line (what goldens hold)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("# cache key:"))


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_source(name, request):
    source, q_len, kv_len, heads, options = GOLDEN_CASES[name]
    text = without_key(kernel_source(patterndsl.compile(source), q_len, kv_len, heads, **options))
    path = GOLDEN / f"{name}.py"
    if request.config.getoption("--update-golden"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; run pytest --update-golden"
    assert text == path.read_text(), f"generated source changed for {name}; run pytest --update-golden if intended"


# Ragged batches and paged caches (codegen/ragged.py): name -> (source, kind, page size, rows, dtype, head dim).
RAGGED_GOLDEN_CASES = {
    "ragged_streaming_decode_paged_forward": (
        "pattern streaming(span = 256, sinks = 4) { causal & (window(span) | sink(sinks)) }",
        "forward", 16, 16, torch.float16, 128,
    ),
    "ragged_per_head_backward": (
        "pattern mix { heads 0..3: causal & window(64)\n causal & sink(4) }", "backward", 0, 64, torch.bfloat16, 64,
    ),
    # A decoding step of a route pattern (runtime/triton_ragged_route.py): the choice read from SEL.
    "ragged_route_decode_paged_forward": (
        "pattern moba { heads 0..3: causal & (window(64) | route(4, block = 64, among = causal - window(64)))\n"
        " causal - route(2, block = 32, score = max, qblock = 4) | sink(4) }",
        "forward", 16, 16, torch.float16, 128,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RAGGED_GOLDEN_CASES))
def test_ragged_golden_source(name, request):
    from patterndsl import analysis
    from patterndsl.codegen import ragged

    source, kind, page_size, rows, dtype, head_dim = RAGGED_GOLDEN_CASES[name]
    p = patterndsl.compile(source)
    if "route(" in source:
        from patterndsl.runtime import triton_ragged_route

        groups = triton_ragged_route.groups(p.ir, 8)
    else:
        groups = analysis.plan(p.ir, 256, 256, 8, block=(64, 64), order="identity").groups
    spec = ragged.make_spec(p.ir, groups, kind, 8, 2, head_dim, dtype, page_size, "sm_90", rows)
    text = without_key(ragged.render(spec))
    path = GOLDEN / f"{name}.py"
    if request.config.getoption("--update-golden"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; run pytest --update-golden"
    assert text == path.read_text(), f"generated source changed for {name}; run pytest --update-golden if intended"


def test_source_is_deterministic_valid_python_with_header():
    pattern = patterndsl.compile("pattern w(n = 5) { causal & window(n) | sink(2) }")
    a = kernel_source(pattern, 300, heads=2, head_dim=40, kind="backward")
    b = kernel_source(pattern, 300, heads=2, head_dim=40, kind="backward")
    assert a == b
    ast.parse(a)
    spec = patterndsl.codegen.spec_for(pattern, 300, heads=2, head_dim=40, kind="backward")
    head = a.split("import triton")[0]
    for needle in ("pattern:    w(n=5)", f"cache key:  {spec.key}", "BM=64", "BN=64", "D=40 padded to DP=64"):
        assert needle in head, needle
    for name in generator.kernel_names(spec):
        assert f"def {name}(" in a


def test_cache_key_tracks_everything_that_changes_the_source():
    pattern = patterndsl.compile("pattern p { causal & window(64) }")
    base = patterndsl.codegen.spec_for(pattern, 512, heads=4)
    variants = [
        patterndsl.codegen.spec_for(pattern, 512, heads=4, dtype=torch.bfloat16),
        patterndsl.codegen.spec_for(pattern, 512, heads=4, head_dim=128),
        patterndsl.codegen.spec_for(pattern, 512, heads=4, block=(128, 64)),
        patterndsl.codegen.spec_for(pattern, 512, 640, heads=4),
        patterndsl.codegen.spec_for(pattern, 512, heads=4, kv_heads=2),
        patterndsl.codegen.spec_for(pattern, 512, heads=4, target="sm_80"),
        patterndsl.codegen.spec_for(pattern, 512, heads=4, num_warps=8),
        patterndsl.codegen.spec_for(pattern, 512, heads=4, kind="backward"),
        patterndsl.codegen.spec_for(patterndsl.compile("pattern p { causal & window(65) }"), 512, heads=4),
    ]
    keys = {base.key} | {v.key for v in variants}
    assert len(keys) == len(variants) + 1
    assert patterndsl.codegen.spec_for(pattern, 512, heads=4).key == base.key


def test_full_tiles_carry_no_mask_and_partial_tiles_the_predicate():
    text = kernel_source(patterndsl.compile("pattern p { causal & strided(3) }"), 256, order="identity")
    loops = text.split("def fwd_g0")[1]
    assert "_allowed_g0, True)" in loops and "_allowed_g0, False)" in loops
    predicate = text.split("def _allowed_g0")[1].split("@triton.jit")[0]
    assert "(q - k) % 3 == 0" in predicate and "k <= q" in predicate


def test_floor_semantics_are_explicit_where_operands_may_be_negative():
    pattern = patterndsl.compile("pattern p { where((q - k) // 4 == -1) & blocks(16) }")
    same = kernel_source(pattern, 256, order="identity")
    assert "_fdiv((q - k), 4)" in same and "(q) // (16) == k // 16" in same
    longer_q = kernel_source(pattern, 256, 128, order="identity")  # q = i - 128 can be negative
    assert "_fdiv(q, 16)" in longer_q


@pytest.mark.parametrize(
    ("expr", "code"),
    [
        (sympy.Min(3, sympy.floor((16 * sympy.Symbol("m") + 15) / 16) + 1), "tl.minimum(3, (1 + _fdiv("),
        (sympy.Max(0, sympy.Symbol("m") - 2), "tl.maximum(0, ((-2) + m))"),
        (sympy.ceiling(sympy.Symbol("m") / 3), "(-_fdiv("),
    ],
)
def test_bounds_render(expr, code):
    assert code in bounds.render(expr)


def test_bounds_outside_the_vocabulary_fall_back_to_lists():
    m = sympy.Symbol("m", integer=True)
    assert bounds.render_form(RunForm(m, sympy.Integer(0), m**2, sympy.Integer(0), m)) is None
    assert bounds.render_form(RunForm(m, sympy.Integer(0), m / 2, sympy.Integer(0), m)) is None


def test_route_patterns_get_the_same_kernels_on_run_time_lists():
    pattern = patterndsl.compile("pattern r { causal & (sink(4) | route(topk = 2, block = 16)) }")
    static = patterndsl.compile("pattern r { causal & sink(4) }")
    for kind in generator.KINDS:
        spec = patterndsl.codegen.spec_for(pattern, 256, heads=2, kind=kind, dtype=torch.float32, target="sm_80")
        text = generator.render(spec)
        other = kernel_source(static, 256, heads=2, kind=kind, dtype=torch.float32, target="sm_80")
        assert spec.run_time_lists and generator.kernel_names(spec) == generator.kernel_names(
            patterndsl.codegen.spec_for(static, 256, heads=2, kind=kind)
        )
        # One family: the tile functions, loaders and the precision policy are the same text.
        for shared in ("def _load_rows(", "def _fwd_tile(" if kind == "forward" else "def _dkdv_tile("):
            assert text.split(shared)[1].split("@triton.jit")[0] == other.split(shared)[1].split("@triton.jit")[0]
        assert "TF32" in text.split("import triton")[0] and 'DOT_PRECISION = tl.constexpr("tf32")' in text
        assert "lst * NQT + m" in text and "ROW_PTR + m)" not in text
        assert "idx[:, None].to(tl.int64) * stride" in text  # int64 row offsets, as for static kernels
    layout = spec.run_time_layout()
    assert [t.n_blocks for t in layout.tables] == [16] and layout.chosen_stride == 16 * 16


def test_closed_form_groups_read_no_tile_list():
    pattern = patterndsl.compile("pattern p { causal }")
    plan = plan_from_mask(pattern.mask(128, 128), (32, 32), pattern=pattern.ir, nodes=[pattern.ir.default])
    m = sympy.Symbol("m", integer=True)
    g = plan.groups[0]
    plan.groups = (HeadGroup(g.heads, g.node, g.tiles, g.runs, lambda: RunForm(m, sympy.Integer(0), m + 1, 0, m)),)
    text = generator.render(generator.make_spec(plan, head_dim=32))
    kernel = text.split("def fwd_g0")[1]
    assert "hi = (1 + m)" in kernel and "tl.load(ROW" not in kernel


def test_bad_options_are_pattern_errors():
    pattern = patterndsl.compile("pattern p { causal }")
    for options in ({"dtype": torch.int32}, {"kv_heads": 3, "heads": 4}, {"target": "gfx90a"}, {"kind": "sideways"}):
        options = dict(options)
        heads = options.pop("heads", 1)
        with pytest.raises(patterndsl.PatternError):
            kernel_source(pattern, 64, heads=heads, **options)


def _predicate_text(source, length):
    # The renderer alone: planning a where(...) at a million positions is not what is tested here.
    from patterndsl.codegen.predicate import AuxTables, render_predicate

    pir = patterndsl.compile(source).ir
    return render_predicate("_allowed_g0", pir.default, pir.layout, length, length, AuxTables(), heads=1)


@pytest.mark.parametrize(
    ("source", "length", "wide"),
    [
        ("pattern p { where(q * k % 7 == 0) }", 40_000, False),  # 1.6e9 < 2**31 - 1
        ("pattern p { where(q * k % 7 == 0) }", 50_000, True),  # 2.5e9 > 2**31 - 1
        ("pattern p { where((q * 5000011 * k) % 5 == 0) }", 48, True),
        ("pattern p { where(q - k >= 1000000) }", 1 << 20, False),
        ("pattern p { where(k * 3000 <= q) }", 1 << 20, True),
        ("pattern p { causal & window(1000) }", 1 << 20, False),
    ],
)
def test_int64_arithmetic_only_where_bounds_leave_int32(source, length, wide):
    text = _predicate_text(source, length)
    assert ("tl.int64" in text) == wide, text
    if wide:
        # Every variable is widened before the first product, so no intermediate is computed in int32.
        assert "q64_" in text and "k64_" in text


def test_non_constant_divisors_are_guarded_and_constants_are_not():
    text = _predicate_text("pattern p { where(q > 0 and k % q == 0 or (k // (q + 1)) % 3 == 0) }", 64)
    assert "tl.where(q == 0, 1, q)" in text and "tl.where((q + 1) == 0, 1, (q + 1))" in text
    assert "% (3)" in text and "tl.where(3" not in text


def test_cache_key_hashes_exactly_the_listed_sources(monkeypatch):
    """Each file of KEY_SOURCES changes the key when its content hash changes; an unlisted one does not."""
    pattern = patterndsl.compile("pattern p { causal & window(64) }")
    real = key.file_digest
    changed = None

    def digest(path):
        return "changed" if changed is not None and path == key.PACKAGE / changed else real(path)

    monkeypatch.setattr(key, "file_digest", digest)

    def spec_key(name):
        nonlocal changed
        changed = name
        key.sources_hash.cache_clear()
        return patterndsl.codegen.spec_for(pattern, 512, heads=4).key

    try:
        base = spec_key(None)
        for name in key.KEY_SOURCES:
            assert (key.PACKAGE / name).is_file(), name
            assert spec_key(name) != base, name
        for name in ("codegen/inspect.py", "runtime/cpu.py", "kernel_cache.py", "analysis/plan.py", "api.py"):
            assert name not in key.KEY_SOURCES
            assert spec_key(name) == base, name
    finally:
        key.sources_hash.cache_clear()


def test_key_sources_list_every_template_and_codegen_module_that_renders():
    listed = set(key.KEY_SOURCES)
    templates = {f"codegen/templates/{p.name}" for p in generator.TEMPLATES.glob("*.tmpl")}
    assert templates <= listed
    # Modules the generator calls into for text; inspect (AOT) and key itself do not shape it.
    for module in ("generator", "launch", "routes", "inputs", "predicate", "bounds"):
        assert f"codegen/{module}.py" in listed
    assert "check.py" in listed  # check.expr_bounds picks int32 or int64 predicates


def test_goldens_ignore_the_cache_key_line():
    text = kernel_source(patterndsl.compile("pattern p { causal }"), 128)
    assert "# cache key:" in text and "# cache key:" not in without_key(text)
    assert len(without_key(text).splitlines()) == len(text.splitlines()) - 1


def test_float32_kernels_name_tf32_in_their_header():
    pattern = patterndsl.compile("pattern p { causal }")
    header = kernel_source(pattern, 128, dtype=torch.float32, target="sm_80").split("import triton")[0]
    assert "TF32" in header and "precision:" in header
    assert "TF32" not in kernel_source(pattern, 128, dtype=torch.float16, target="sm_80").split("import triton")[0]
    assert "TF32" not in kernel_source(pattern, 128, dtype=torch.float32, target="interpret").split("import triton")[0]


def test_codegen_never_imports_runtime():
    """Codegen sits below the runtime: rendering and AOT inspection import no runtime module."""
    import subprocess
    import sys

    code = (
        "import sys, patterndsl, torch\n"
        "from patterndsl.codegen import inspect, kernel_source\n"
        "p = patterndsl.compile('pattern m { causal & (sink(4) | route(2, block = 16)) }')\n"
        "kernel_source(p, 128, kind='backward')\n"
        "kernel_source(patterndsl.compile('pattern c { causal }'), 128)\n"
        "print(sorted(m for m in sys.modules if m.startswith('patterndsl.runtime')))\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_launch_table_rows():
    from patterndsl.codegen import launch

    static = launch(64, "sm_90", "forward", "float16")
    assert static.tiles == (64, 64) and static.int64_offsets and static.dot_precision == "tf32"
    routed = launch(64, "sm_90", "forward", "float16", run_time=True)
    assert routed.tiles == (64, 32) and routed.num_warps == 8
    assert launch(128, "sm_80", "backward", "bfloat16", run_time=True).num_stages == 1
    assert launch(64, "interpret", "forward", "float32").dot_precision == "ieee"
    assert launch(64, "interpret", "forward", "float32", run_time=True).tiles is None
    # The spec of a route pattern takes the routed row; its header and kernel_source say so.
    pattern = patterndsl.compile("pattern r { causal & route(2, block = 64) }")
    spec = patterndsl.codegen.spec_for(pattern, 512, target="sm_80", kind="backward", head_dim=128)
    row = launch(128, "sm_80", "backward", "float16", run_time=True)
    assert (spec.block_m, spec.block_n) == row.tiles and (spec.num_warps, spec.num_stages) == (8, 1)
    assert "BN=32 keys; num_warps=8, num_stages=1" in generator.render(spec)


def test_show_triton_uses_the_launch_table_unless_block_is_given(capsys, tmp_path):
    from patterndsl import cli

    path = tmp_path / "r.pdsl"
    path.write_text("pattern r { causal & (blocks(64) | route(2, block = 64, among = causal - blocks(64))) }")
    assert cli.main(["show", str(path), "--stage", "triton", "--seq", "512"]) == 0
    assert "BM=64 query rows x BN=32 keys" in capsys.readouterr().out
    assert (
        cli.main(["show", str(path), "--stage", "triton", "--seq", "512", "--block", "32x16", "--kind", "backward"])
        == 0
    )
    out = capsys.readouterr().out
    assert "BM=32 query rows x BN=16 keys" in out and "def bwd_dkdv_g0(" in out and "lst * NKT + n" in out
