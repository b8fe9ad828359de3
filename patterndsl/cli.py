"""The ``patterndsl`` command: the user-facing shell around every pipeline stage.

Comes in: command-line arguments (``check``, ``show``, ``plot``, ``bench``,
``demo``). Goes out: text on stdout, PNG files, and an exit status: 0 on
success, 1 for an error in the pattern or its inputs (a located
``PatternError``), 2 for a malformed command line. A user error never prints
a traceback. Each subcommand calls the public API (:mod:`patterndsl.api`) and
the stage entry points named in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from patterndsl import ir, semantics
from patterndsl.api import Pattern, compile, load
from patterndsl.errors import PatternError, PatternValueError, listing

STAGES = ("ir", "plan", "triton", "ptx", "sass", "reach")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Largest ``heads * Lq * Lk`` for which ``plot`` draws the dense mask.
PLOT_MASK_LIMIT = 1 << 22
#: Heads of one pattern that reads ``h`` which ``--stage reach`` analyses one by one.
REACH_HEADS = 64

#: The pattern ``patterndsl demo`` compiles: 3-D video neighborhood attention, causal in time.
DEMO_SOURCE = """\
# Video tokens on a (time, height, width) grid: every token sees a 3 x 5 x 5
# box of tokens around it, causal in time (no token sees a later frame) and
# dilated by 2 in space, with the semantics of the NATTEN library.
# More patterns in examples/.
pattern video(T = 4, H = 16, W = 16) {
    layout grid(t = T, y = H, x = W)
    neighborhood((3, 5, 5), dilation = (1, 2, 2), causal = (true, false, false))
}
"""


class UsageError(PatternError):
    """A malformed command line (bad option value, missing argument)."""


# --------------------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so ``main`` can return a status."""

    def error(self, message: str):
        raise UsageError(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}")


def parse_param(text: str) -> tuple[str, Any]:
    """Parse one ``--param K=V``: V is an integer, ``true``/``false``, or a tuple ``(3,7,7)`` / ``3,7,7``.

    Args:
        text: the option value.

    Returns:
        ``(name, value)``; never evaluates Python.

    Raises:
        UsageError: when the text is not of that form.
    """
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise UsageError(f"--param {text!r}: expected NAME=VALUE, e.g. --param span=256")
    try:
        return name, _param_value(value)
    except ValueError:
        raise UsageError(f"--param {text!r}: a value is an integer, true, false, or a tuple like (3,7,7)") from None


def _param_value(text: str) -> Any:
    if text.startswith("(") and text.endswith(")"):
        inner = text[1:-1].strip()
        items = [part.strip() for part in inner.split(",")]
        if items and items[-1] == "":
            items.pop()  # a trailing comma, as in (3,)
        if not items:
            raise ValueError(text)
        return tuple(_scalar(item) for item in items)
    if "," in text:
        return tuple(_scalar(item.strip()) for item in text.split(","))
    return _scalar(text)


def _scalar(text: str) -> int | bool:
    if text == "true":
        return True
    if text == "false":
        return False
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    raise ValueError(text)


def parse_block(text: str) -> tuple[int, int]:
    """Parse ``--block BMxBN`` (or a single ``B`` for square tiles) into positive integers."""
    match = re.fullmatch(r"\s*([0-9]+)\s*(?:[xX*]\s*([0-9]+)\s*)?", text)
    if not match:
        raise UsageError(f"--block {text!r}: expected BMxBN, e.g. --block 128x64")
    bm = int(match.group(1))
    bn = int(match.group(2) or bm)
    if bm <= 0 or bn <= 0:
        raise UsageError(f"--block {text!r}: tile sizes must be positive")
    return bm, bn


def _positive(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _add_pattern_args(p: argparse.ArgumentParser, seq_default: int | None = None) -> None:
    p.add_argument("file", metavar="FILE", help="pattern source file (.pdsl)")
    p.add_argument("--pattern", metavar="NAME", help="which pattern, when the file defines several")
    p.add_argument(
        "--param",
        metavar="K=V",
        action="append",
        default=[],
        help="bind a parameter: integer, true/false, or a tuple (3,7,7); repeatable",
    )
    seq_help = "query length (default: the layout's size when the pattern has one"
    seq_help += f", else {seq_default})" if seq_default else ")"
    p.add_argument("--seq", metavar="N", type=_positive, help=seq_help)
    p.add_argument("--kv-seq", metavar="M", type=_positive, help="key length (default: N)")
    p.add_argument("--heads", metavar="H", type=_positive, default=1, help="query heads (default 1)")
    p.add_argument(
        "--block",
        metavar="BMxBN",
        help="tile size (default 128x128 for plans; for kernels the launch table's tiles for --target)",
    )
    p.add_argument("--order", choices=("auto", "identity"), default="auto", help="token order of the plan")
    p.add_argument(
        "--input",
        metavar="NAME=SPEC",
        action="append",
        default=[],
        help="a run-time input for one batch element: lengths:300,700,24 (document ids of packed documents), "
        "positions:0,17 (1 at those positions, 0 elsewhere), values:3,1,4 (the entries) or value:5; repeatable",
    )
    p.set_defaults(seq_default=seq_default)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``patterndsl`` command (all subcommands)."""
    parser = _Parser(
        prog="patterndsl",
        description="A compiler for attention sparsity patterns: check, inspect, plot and time .pdsl files.",
        epilog="Run 'patterndsl COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("check", help="parse and check a pattern file", description="Parse and check FILE.")
    p.add_argument("file", metavar="FILE", help="pattern source file (.pdsl)")

    p = sub.add_parser(
        "show",
        help="print one stage of the pipeline",
        description="Print one stage: the bound IR, the block plan (tile map and statistics), the generated "
        "Triton source, the ahead-of-time PTX/SASS, or the multi-layer reachability.",
    )
    _add_pattern_args(p)
    p.add_argument("--stage", choices=STAGES, required=True, help="which stage to print")
    p.add_argument(
        "--target", choices=("sm_80", "sm_90"), default="sm_90", help="GPU the kernel is specialised to (default sm_90)"
    )
    p.add_argument("--layers", metavar="N", type=_positive, help="stacked layers for --stage reach (default 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="kernel dtype (default float16)")
    p.add_argument("--head-dim", metavar="D", type=_positive, default=64, help="head dimension (default 64)")
    p.add_argument("--kind", choices=("forward", "backward"), default="forward", help="which kernel to generate")
    p.add_argument("--ascii", action="store_true", help="draw tile maps with ASCII characters only")

    p = sub.add_parser(
        "plot",
        help="draw the mask and the tile map into a PNG",
        description="Draw the dense mask (small sizes only) and the tile map of every head group with matplotlib.",
    )
    _add_pattern_args(p)
    p.add_argument("-o", "--output", metavar="FILE.png", required=True, help="the PNG to write")

    p = sub.add_parser(
        "bench",
        help="time the pattern against dense references on this machine",
        description="Time the patterndsl CPU forward against SDPA with a dense mask and, when it works "
        "here, compiled FlexAttention. Prints median times and ratios.",
    )
    _add_pattern_args(p, seq_default=1024)
    p.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    p.add_argument("--head-dim", metavar="D", type=_positive, default=64, help="head dimension (default 64)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="tensor dtype (default float32)")
    p.add_argument("--repeat", type=_positive, default=5, help="timed runs per method (default 5)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes a while)")

    sub.add_parser(
        "demo",
        help="compile a bundled example and show every stage",
        description="Compile a bundled 3-D video neighborhood pattern and show its IR, block plan, generated "
        "kernel and CPU attention results against a float64 dense reference.",
    )
    return parser


# --------------------------------------------------------------------------- shared helpers


def _load(args) -> Pattern:
    params = dict(parse_param(text) for text in args.param)
    try:
        return load(args.file, name=args.pattern, **params)
    except PatternError as err:
        # The values came from the command line, not from Python keyword arguments.
        message = err.message.replace("the keyword argument ", "--param ").replace(" passed from Python", "")
        message = message.replace(" from Python)", " from --param)").replace("pass name=...", "pass --pattern NAME")
        if message == err.message:
            raise
        raise type(err)(message, err.span, err.source) from None


def _lengths(args, pattern: Pattern, stage: str) -> tuple[int, int]:
    seq = args.seq
    if seq is None and pattern.ir.layout is not None:
        seq = pattern.ir.layout.size
    if seq is None:
        seq = args.seq_default
    if seq is None:
        raise UsageError(f"{stage} needs the sequence length: add --seq N")
    return seq, args.kv_seq or seq


def parse_input(text: str, kv_len: int) -> tuple[str, torch.Tensor]:
    """``--input NAME=SPEC`` -> ``(name, int64 tensor)`` for one batch element (see the option's help)."""
    name, eq, spec = text.partition("=")
    kind, colon, values = spec.partition(":")
    name, kind = name.strip(), kind.strip()
    if not eq or not colon or not name:
        raise UsageError(f"--input expects NAME=KIND:VALUES (e.g. doc=lengths:300,700), got {text!r}")
    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--input {name}: the values must be integers separated by commas, got {values!r}") from None
    if kind == "lengths":
        if sum(numbers) != kv_len or any(n < 1 for n in numbers):
            raise UsageError(f"--input {name}: lengths must be >= 1 and add up to the key length {kv_len}")
        from patterndsl import segments

        return name, segments(numbers)
    if kind == "positions":
        out = torch.zeros(kv_len, dtype=torch.int64)
        if any(not 0 <= n < kv_len for n in numbers):
            raise UsageError(f"--input {name}: positions must lie in [0, {kv_len})")
        out[numbers] = 1
        return name, out
    if kind == "values":
        return name, torch.tensor(numbers, dtype=torch.int64)
    if kind == "value" and len(numbers) == 1:
        return name, torch.tensor(numbers[0], dtype=torch.int64)
    raise UsageError(f"--input {name}: unknown kind {kind!r}; use lengths:, positions:, values: or value:")


def _inputs(args, kv_len: int) -> dict:
    return dict(parse_input(text, kv_len) for text in getattr(args, "input", []))


def _plan_for(pattern: Pattern, q_len: int, kv_len: int, heads: int, block, order: str, args):
    """The plan drawn by ``show``/``plot``: the call-time plan of batch element 0 when inputs are given."""
    inputs = _inputs(args, kv_len) if args is not None else {}
    plan = pattern.plan(q_len, kv_len, heads, block=block, order=order, **inputs)
    return (plan.element(0) if inputs else plan), inputs


def _block(args, default: tuple[int, int]) -> tuple[int, int]:
    return parse_block(args.block) if args.block else default


def _use_ascii(args) -> bool:
    if args is not None and getattr(args, "ascii", False):
        return True
    try:
        "░█".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return True
    return False


def _route_inputs(pattern: Pattern, heads: int, q_len: int, kv_len: int, head_dim: int = 32):
    """Seeded random ``q``/``k`` for drawing a route pattern's run-time choice."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, q_len, head_dim, generator=gen)
    k = torch.randn(1, heads, kv_len, head_dim, generator=gen)
    return q, k


# --------------------------------------------------------------------------- commands


def cmd_check(args) -> int:
    """``patterndsl check FILE``: parse and check every definition in the file."""
    from patterndsl import check, grammar

    path = Path(args.file)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PatternError(f"cannot read pattern file {str(path)!r}: {exc}") from None
    try:
        module = grammar.parse(source, str(path))
    except PatternError as err:
        raise err.with_source(source, str(path)) from None
    warnings: list[str] = []
    errors = check.check_module(module, source, str(path), warnings)
    for text in warnings:
        print(text, file=sys.stderr)
    for err in errors:
        print(err.with_source(source, str(path)), file=sys.stderr)
    if errors:
        print(f"{path}: {len(errors)} error{'s' if len(errors) != 1 else ''}", file=sys.stderr)
        return 1
    names = listing(p.name for p in module.patterns)
    count = len(module.patterns)
    print(f"{path}: OK ({count} pattern{'s' if count != 1 else ''}: {names})")
    return 0


def cmd_show(args) -> int:
    """``patterndsl show``: print one stage of the pipeline."""
    pattern = _load(args)
    if args.stage == "ir":
        print(pattern)
        if pattern.ir.score is not None:
            from patterndsl.scores import describe_derivatives

            print(describe_derivatives(pattern.ir.score))
        return 0
    q_len, kv_len = _lengths(args, pattern, f"--stage {args.stage}")
    if args.stage == "plan":
        print(render_plan(pattern, q_len, kv_len, args.heads, _block(args, (128, 128)), args.order, args))
    elif args.stage == "triton":
        print(pattern.kernel_source(q_len, kv_len, args.heads, **_kernel_options(args)), end="")
    elif args.stage in ("ptx", "sass"):
        print(render_aot(pattern, q_len, kv_len, args))
    else:
        print(render_reach(pattern, q_len, kv_len, args))
    return 0


def _kernel_options(args) -> dict:
    """The codegen options of ``show --stage triton|ptx|sass`` (``--block`` only when given)."""
    options = {
        "head_dim": args.head_dim,
        "dtype": DTYPES[args.dtype],
        "kind": args.kind,
        "order": args.order,
        "target": args.target,
    }
    if args.block:
        options["block"] = parse_block(args.block)
    return options


def render_plan(pattern: Pattern, q_len: int, kv_len: int, heads: int, block, order: str, args=None) -> str:
    """Tile maps of every head group followed by the plan statistics.

    Args:
        pattern: the bound pattern.
        q_len, kv_len, heads: sizes.
        block: ``(BM, BN)``.
        order: ``"auto"`` or ``"identity"``.
        args: parsed options (``ascii``, ``head_dim``), or None for defaults.

    Returns:
        The text to print.
    """
    plan, _ = _plan_for(pattern, q_len, kv_len, heads, block, order, args)
    ascii_only = _use_ascii(args) if args is not None else False
    return _plan_text(plan, ascii_only, getattr(args, "head_dim", 64))


def _plan_text(plan, ascii_only: bool, head_dim: int = 64) -> str:
    from patterndsl import pictures

    text = pictures.draw_plan(plan, ascii_only) + "\n\n" + pictures.format_stats(plan, head_dim)
    return text + ("\n\n" + pictures.draw_parts(plan, ascii_only) if plan.parts else "")


def render_aot(pattern: Pattern, q_len: int, kv_len: int, args) -> str:
    """``--stage ptx|sass``: compile the generated kernels ahead of time for ``--target`` (no GPU needed).

    ``ptx`` prints each kernel's PTX; ``sass`` prints the resource table
    (registers, spills, shared memory, MMA instructions) and then the SASS.
    """
    from patterndsl import progress
    from patterndsl.codegen import inspect

    with progress.bar(1, f"building kernels for {args.target}") as shown:
        kernels = inspect.aot_kernels(pattern, q_len, kv_len, args.heads, **_kernel_options(args))
        shown.update()
    if args.stage == "ptx":
        return inspect.render_ptx(kernels)
    listings = [f"// ===== {k.name} ({k.target})\n{inspect.sass(k.asm['cubin'])}" for k in kernels]
    return inspect.render_resources(kernels) + "\n\n" + "\n".join(listings)


def render_reach(pattern: Pattern, q_len: int, kv_len: int, args) -> str:
    """``--stage reach``: whether ``--layers`` stacked layers connect every query to every key it may depend on.

    Heads that share one pattern are analysed once; ``--block`` adds the tile graph's lower bound.
    """
    from patterndsl.analysis import reachability

    if kv_len != q_len:
        raise UsageError("--stage reach stacks layers of self-attention: --kv-seq must equal --seq")
    block = parse_block(args.block) if args.block else None
    # Work follows the heads lines, not the head count: heads of one rule that does not read h share one answer.
    groups: dict[tuple, list[range]] = {}
    for lo, hi, node in semantics.head_segments(pattern.ir, args.heads):
        if not ir.uses_head(node):
            groups.setdefault((node, None), []).append(range(lo, hi))
            continue
        if hi - lo > REACH_HEADS:
            raise PatternValueError(
                f"--stage reach analyses each head of a pattern that reads h on its own: heads {lo}..{hi} are "
                f"{hi - lo}, at most {REACH_HEADS}"
            )
        groups.update({(node, h): [range(h, h + 1)] for h in range(lo, hi)})
    parts = []
    for ranges in groups.values():
        result = reachability(pattern.ir, q_len, layers=args.layers or 1, head=ranges[0].start, block=block)
        parts.append((ranges, result.text()))
    if len(parts) == 1:
        return parts[0][1]
    return "\n\n".join(f"{_heads_label(ranges)}:\n{text}" for ranges, text in parts)


def _heads_label(ranges: list[range]) -> str:
    count = sum(len(r) for r in ranges)
    if count <= 8:
        return ("head " if count == 1 else "heads ") + ", ".join(str(h) for r in ranges for h in r)
    return "heads " + ", ".join(f"{r.start}..{r.stop}" if len(r) > 1 else str(r.start) for r in ranges)


def cmd_plot(args) -> int:
    """``patterndsl plot``: the mask (small sizes) and the tile map as a PNG."""
    from patterndsl import progress

    pattern = _load(args)
    q_len, kv_len = _lengths(args, pattern, "plot")
    with progress.bar(2, "planning") as shown:
        plan, inputs = _plan_for(pattern, q_len, kv_len, args.heads, _block(args, (128, 128)), args.order, args)
        shown.set_description_str("drawing")
        shown.update()
        out = _draw(args, pattern, plan, inputs, q_len, kv_len)
        shown.update()
    print(f"wrote {out}")
    return 0


def _draw(args, pattern, plan, inputs, q_len: int, kv_len: int):
    """The mask (when small enough) and the tile map of ``plot``, written to ``args.output``."""
    from patterndsl import pictures

    mask = note = None
    size = args.heads * q_len * kv_len
    if size > PLOT_MASK_LIMIT:
        note = (
            f"mask not drawn: heads x Lq x Lk = {size:,} is above the limit of {PLOT_MASK_LIMIT:,};\n"
            "the tile map is exact at any size"
        )
        print(f"patterndsl: {note.replace(chr(10), ' ')}", file=sys.stderr)
    elif pattern.is_dynamic:
        q, k = _route_inputs(pattern, args.heads, q_len, kv_len)
        mask = pattern.mask(q_len, kv_len, args.heads, q=q, k=k, **inputs)[0]
    elif inputs:
        mask = pattern.mask(q_len, kv_len, args.heads, **inputs)[0]
    else:
        mask = pattern.mask(q_len, kv_len, args.heads)
    title = repr(pattern) + (" for " + ", ".join(args.input) if inputs else "")
    if pattern.is_dynamic and mask is not None:
        title += " (route chosen for seeded random q, k)"
    return pictures.plot_plan(plan, args.output, mask=mask, mask_note=note, title=title)


def _time_ms(fn, repeat: int, what: str = "timing") -> tuple[float, float]:
    """Median and best wall time of ``fn`` in milliseconds, after one untimed warm-up call
    (a progress bar on a terminal)."""
    from patterndsl import progress

    times = []
    with progress.bar(repeat + 1, what) as shown:
        fn()  # warm-up: plan and kernel caches, lazy initialisation
        shown.update()
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            shown.update()
    return statistics.median(times) * 1e3, min(times) * 1e3


def _flex_runner(mask: torch.Tensor, q, k, v, scale: float):
    """Compiled FlexAttention whose mask_mod looks the pattern up in the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dense = mask if mask.dim() == 4 else mask.unsqueeze(0).expand(q.shape[0], *mask.shape)
    dense = dense.contiguous()

    def mask_mod(b, h, qi, kj):
        return dense[b, h, qi, kj]

    block_mask = create_block_mask(mask_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=scale)


def cmd_bench(args) -> int:
    """``patterndsl bench``: median forward times of patterndsl (CPU) vs SDPA (dense mask) vs FlexAttention."""
    pattern = _load(args)
    q_len, kv_len = _lengths(args, pattern, "bench")
    heads, dtype, d = args.heads, DTYPES[args.dtype], args.head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, heads, q_len, d, generator=gen).to(dtype)
    k = torch.randn(args.batch, heads, kv_len, d, generator=gen).to(dtype)
    v = torch.randn(args.batch, heads, kv_len, d, generator=gen).to(dtype)
    scale = d**-0.5
    if pattern.is_dynamic:
        mask = pattern.mask(q_len, kv_len, heads, q=q, k=k)
    else:
        mask = pattern.mask(q_len, kv_len, heads).unsqueeze(0)

    print(f"{pattern!r}: batch {args.batch}, heads {heads}, Lq {q_len}, Lk {kv_len}, head_dim {d}, {args.dtype}")
    print(f"density {mask.float().mean().item():.2%}; device cpu, {torch.get_num_threads()} threads")
    with torch.no_grad():
        ours = _time_ms(lambda: pattern(q, k, v, scale=scale, backend="cpu"), args.repeat, "patterndsl cpu")
        out = pattern(q, k, v, scale=scale, backend="cpu")
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ref_ms = _time_ms(lambda: sdpa(q, k, v, attn_mask=mask, scale=scale), args.repeat, "SDPA")
        ref = sdpa(q, k, v, attn_mask=mask, scale=scale)
    rows_ok = mask.any(-1)  # rows with no allowed key are NaN in SDPA and zero in patterndsl
    err = (out.float() - ref.float()).abs()[rows_ok].max().item() if rows_ok.any() else 0.0
    results = [("patterndsl cpu", ours, f"max |diff| vs SDPA {err:.2e}"), ("SDPA dense mask", ref_ms, "")]
    if args.no_flex:
        results.append(("FlexAttention", None, "skipped (--no-flex)"))
    else:
        try:
            with torch.no_grad():
                flex_ms = _time_ms(_flex_runner(mask, q, k, v, scale), args.repeat, "FlexAttention (compiling)")
            results.append(("FlexAttention compiled", flex_ms, ""))
        except Exception as exc:  # any failure of torch.compile here only means the reference is unavailable
            results.append(("FlexAttention", None, f"unavailable here: {type(exc).__name__}: {str(exc)[:120]}"))
    print(f"{'method':<24}{'median ms':>11}{'best ms':>10}{'median / ours':>15}  note")
    for name, ms, note in results:
        if ms is None:
            print(f"{name:<24}{'-':>11}{'-':>10}{'-':>15}  {note}")
        else:
            print(f"{name:<24}{ms[0]:>11.3f}{ms[1]:>10.3f}{ms[0] / ours[0]:>14.2f}x  {note}")
    for name, ms, _ in results[1:]:
        if ms is not None:
            ratio = ms[0] / ours[0]
            verdict = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
            print(f"patterndsl cpu is {verdict} than {name} (medians of {args.repeat} runs)")
    return 0


def cmd_demo(args) -> int:
    """``patterndsl demo``: every available stage on the bundled video pattern."""
    pattern = compile(DEMO_SOURCE)
    heads, head_dim = 2, 32
    seq = pattern.ir.layout.size
    print("== source (bundled) ==")
    print(DEMO_SOURCE)
    print("== bound IR (patterndsl show --stage ir) ==")
    print(pattern)
    print()
    _demo_section("block plan, 64x64 tiles (patterndsl show --stage plan)", lambda: _demo_plan(pattern, seq, heads))
    _demo_section("generated Triton forward kernel (excerpt)", lambda: _demo_kernel(pattern, seq, heads))
    _demo_section(
        "attention on CPU vs a dense float64 reference", lambda: _demo_attention(pattern, seq, heads, head_dim)
    )
    return 0


def _demo_section(title: str, body) -> None:
    print(f"== {title} ==")
    print(body())
    print()


def _demo_plan(pattern: Pattern, seq: int, heads: int) -> str:
    identity = pattern.plan(seq, seq, heads, block=(64, 64), order="identity")
    auto = pattern.plan(seq, seq, heads, block=(64, 64), order="auto")
    return (
        f"{_plan_text(auto, _use_ascii(None))}\n\nblock efficiency: {identity.stats.block_efficiency:.2%} in the "
        f"original token order, {auto.stats.block_efficiency:.2%} in the order the planner chose ({auto.order})"
    )


def _demo_kernel(pattern: Pattern, seq: int, heads: int) -> str:
    source = pattern.kernel_source(seq, seq, heads, head_dim=64, dtype=torch.float16, block=(64, 64))
    lines = source.splitlines()
    header = [line for line in lines if line.startswith(("# pattern:", "# tiles:", "# order:"))]
    # The pattern's own predicate, compiled to Triton, is the most telling part of the kernel.
    start = next((n for n, line in enumerate(lines) if line.startswith("def _allowed_")), None)
    if start is None:
        body = lines[:25]
    else:
        end = next((n for n in range(start + 1, len(lines)) if not lines[n].strip()), len(lines))
        body = lines[start - 1 : end]
    shown = "\n".join([*header, "...", *body])
    return f"{shown}\n... ({len(lines)} lines in all; 'patterndsl show FILE --stage triton' prints them)"


def _demo_attention(pattern: Pattern, seq: int, heads: int, head_dim: int) -> str:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, head_dim, generator=gen) for _ in range(3))
    start = time.perf_counter()
    out, lse = pattern(q, k, v, return_lse=True, backend="cpu")
    elapsed = time.perf_counter() - start
    allowed = pattern.mask(seq, seq, heads).unsqueeze(0)
    scores = (q.double() @ k.double().transpose(-1, -2)) * head_dim**-0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    ref = torch.softmax(scores, -1) @ v.double()
    ref_lse = torch.logsumexp(scores, -1)
    return (
        f"q, k, v: [1, {heads}, {seq}, {head_dim}] float32; patterndsl CPU path took {elapsed * 1e3:.1f} ms\n"
        f"max |out - reference| = {(out.double() - ref).abs().max().item():.2e}\n"
        f"max |lse - reference| = {(lse.double() - ref_lse).abs().max().item():.2e}"
    )


COMMANDS = {"check": cmd_check, "show": cmd_show, "plot": cmd_plot, "bench": cmd_bench, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Run the ``patterndsl`` command.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 an error in the pattern or its inputs, 2 a malformed command line.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(err.message, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version print and exit through argparse
        return int(exc.code or 0)
    try:
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"patterndsl {args.command}: error: {err.message}", file=sys.stderr)
        return 2
    except PatternError as err:
        # A located error already starts with FILE:LINE:COLUMN, as compilers print them.
        prefix = "" if err.location else f"patterndsl {args.command}: error: "
        print(f"{prefix}{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
