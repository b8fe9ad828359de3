"""The public Python API: a thin layer over the pipeline's stages.

Comes in: pattern source text (or a file) and parameters. Goes out: a
:class:`Pattern` whose methods call the stages in order — grammar -> check
-> semantics / analysis -> codegen / runtime — and nothing else.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from patterndsl import ir
from patterndsl.errors import PatternError, PatternTypeError, PatternValueError, did_you_mean
from patterndsl.semantics import MASK_LIMIT  # the largest dense mask Pattern.mask builds (entries)


class Pattern:
    """A parsed, checked pattern with every parameter bound.

    Attributes:
        ir: the canonical :class:`patterndsl.ir.PatternIR`.
        name: the pattern's name.
        params: the bound parameter values.
    """

    def __init__(self, pir: ir.PatternIR, source: str | None = None, filename: str | None = None):
        self.ir = pir
        self.source = source
        self.filename = filename

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.ir.params)

    @property
    def is_dynamic(self) -> bool:
        """True when some head's pattern is chosen from ``q``/``k`` (``route``, ``cluster``, ``lsh``)."""
        nodes = [r.node for r in self.ir.heads] + ([self.ir.default] if self.ir.default is not None else [])
        return any(ir.is_dynamic(n) or ir.contents(n) for n in nodes)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.ir.params)
        return f"<Pattern {self.name}({params})>"

    def __str__(self) -> str:
        from patterndsl.printer import pattern_to_source

        return pattern_to_source(self.ir)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.ir == self.ir

    def __hash__(self) -> int:
        return hash(self.ir)

    @contextmanager
    def _located(self):
        """Give errors of later stages (which only know spans) this pattern's source text for the caret."""
        try:
            yield
        except PatternError as err:
            located = self._locate(err)
            if located is None:
                raise
            raise located from None

    def _locate(self, err: PatternError) -> PatternError | None:
        """``err`` with this pattern's source text, or None when it has its source or no span to place."""
        if err.span is None or err.source is not None or self.source is None:
            return None
        return err.with_source(self.source, self.filename)

    def mask(self, q_len: int, kv_len: int | None = None, heads: int = 1, *, q=None, k=None, **inputs) -> torch.Tensor:
        """The dense meaning, for inspection and tests at small sizes.

        Args:
            q_len: number of queries ``Lq``.
            kv_len: number of keys ``Lk`` (default ``Lq``).
            heads: number of query heads.
            q, k: for patterns with ``route``, the tensors ``[batch, heads, seq, head_dim]``
                the selection is computed from.
            **inputs: the pattern's run-time inputs by name (LANGUAGE.md section 7).

        Returns:
            Bool tensor ``[heads, Lq, Lk]`` (``[batch, heads, Lq, Lk]`` with ``q``/``k`` or inputs).
        """
        from patterndsl import semantics

        _dense_size(q_len, kv_len, heads, q)
        with self._located():
            # Inputs that only the score reads do not change the mask: it needs none of them.
            needed = inputs or ir.mask_input_names(self.ir)
            bound = self._inputs(inputs, q_len, kv_len, heads, "mask()", optional=True) if needed else None
            if bound is not None:
                _dense_size(q_len, kv_len, heads * bound.batch, None)
            return semantics.mask(self.ir, q_len, kv_len, heads, q=q, k=k, inputs=bound)

    def _inputs(self, given: dict, q_len, kv_len, heads, who: str, optional: bool = False):
        """The validated inputs of a call (None when the pattern declares none and none are given).

        ``optional``: inputs that only the score reads may be left out (``mask()`` and ``plan()``).
        """
        from patterndsl import binding

        if not given and not self.ir.inputs:
            return None
        kv = q_len if kv_len is None else kv_len
        sizes = (kv, heads) if isinstance(kv, int) and isinstance(heads, int) else (None, None)
        skip = frozenset(d.name for d in self.ir.inputs) - ir.mask_input_names(self.ir) if optional else frozenset()
        return binding.bind(self.ir, given, *sizes, who=who, optional=skip)

    def plan(
        self,
        q_len: int,
        kv_len: int | None = None,
        heads: int = 1,
        block: tuple[int, int] = (128, 128),
        order: str = "auto",
        **inputs,
    ):
        """The block structure at these sizes (see :class:`patterndsl.analysis.plan.BlockPlan`).

        Args:
            q_len, kv_len, heads: sizes to plan for (``kv_len`` defaults to ``q_len``).
            block: tile sizes ``(BM, BN)``.
            order: ``"auto"`` (may reorder tokens to make tiles denser) or ``"identity"``.
            **inputs: the pattern's run-time inputs (LANGUAGE.md section 7): the plan is then
                exact for that data (tiles ``[batch, heads, nqb, nkb]``); without them, tiles
                that depend on the data are 3.

        Returns:
            A ``BlockPlan``, or an ``InputPlan`` for given inputs.
        """
        from patterndsl import analysis

        block = _block(block)
        _choice("order", order, ORDERS)
        with self._located():
            if not inputs:
                return analysis.plan(self.ir, q_len, kv_len, heads, block=block, order=order)
            if any(ir.contents(n) for n in self.ir.nodes()):
                # cluster(...)/lsh(...) label tokens from Q and K, which a plan does not have: the tiles they
                # can reach stay 3 for every batch element (the sorted call-time plan is analysis.clusterplan's).
                from patterndsl.analysis import clusterplan

                bound = self._inputs(inputs, q_len, kv_len, heads, "plan()", optional=True)
                static = analysis.plan(self.ir, q_len, kv_len, heads, block=block, order=order)
                return clusterplan.per_element(static, bound)
            from patterndsl.analysis import inputplan
            from patterndsl.runtime import plans

            bound = self._inputs(inputs, q_len, kv_len, heads, "plan()", optional=True)
            # The plan without data is the same at every call of these sizes: the runtime's cache keeps it.
            key = plans.register(self.ir, block, order)
            static = plans.get(key, q_len, q_len if kv_len is None else kv_len, heads)
            if any(ir.routes(n) for n in self.ir.nodes()):
                from patterndsl.runtime import route_inputs

                return route_inputs.plan_for(static, bound)
            return inputplan.call_plan(static, bound)

    def __call__(
        self,
        q,
        k,
        v,
        scale=None,
        return_lse=False,
        backend="auto",
        kv_lengths=None,
        q_lengths=None,
        block_table=None,
        **inputs,
    ):
        """Attention under this pattern; see :func:`attention` (``**inputs``: its run-time inputs)."""
        # As ``with self._located():``, without the context manager's cost on every decoding step.
        try:
            return attention(
                q,
                k,
                v,
                self,
                scale=scale,
                return_lse=return_lse,
                backend=backend,
                kv_lengths=kv_lengths,
                q_lengths=q_lengths,
                block_table=block_table,
                **inputs,
            )
        except PatternError as err:
            located = self._locate(err)
            if located is None:
                raise
            raise located from None

    def kernel_source(self, q_len: int, kv_len: int | None = None, heads: int = 1, **options) -> str:
        """The generated Triton source for a shape and dtype, as text (patterns with ``route`` too).

        Args:
            q_len, kv_len, heads: sizes (the plan is specialised to them).
            **options: ``head_dim`` (64), ``dtype`` (``torch.float16``), ``target`` (``"sm_90"``;
                ``"sm_80"`` or ``"interpret"``), ``block`` (the launch table's tiles for the target,
                :func:`patterndsl.codegen.launch_tiles`, e.g. (64, 64) for float16 forward at head
                dim 64 and for the interpreter), ``kind`` (``"forward"`` or ``"backward"``),
                ``kv_heads`` (``heads``), ``order`` (``"auto"``), ``num_warps``, ``num_stages``.

        Returns:
            Deterministic Triton source text; for a plan that runs as parts (``plan().parts``), each
            part's source in turn under a line ``# ===== part i of n: order ..., tiles BMxBN``.
        """
        from patterndsl import codegen

        _kernel_options(options)
        with self._located():
            return codegen.kernel_source(self, q_len, kv_len, heads, **options)


def compile(source: str, name: str | None = None, **params) -> Pattern:
    """Parse, check and bind one pattern.

    Args:
        source: pattern-language text with one or more definitions.
        name: which definition, when there are several.
        **params: parameter values (int, bool or tuples of those).

    Returns:
        A :class:`Pattern`.

    Raises:
        PatternError: on any error in the text or the parameters.
    """
    return _compile(source, None, name, params)


def load(path, name: str | None = None, **params) -> Pattern:
    """Like :func:`compile`, reading the source from ``path`` (a ``str`` or ``os.PathLike``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise PatternTypeError(f"load() needs a file path (str or os.PathLike), got {type(path).__name__}")
    p = Path(path)
    try:
        source = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PatternError(f"cannot read pattern file {str(p)!r}: {exc}") from None
    return _compile(source, str(p), name, params)


def _compile(source: str, filename: str | None, name: str | None, params: dict) -> Pattern:
    from patterndsl import check, grammar

    if not isinstance(source, str):
        raise PatternError(f"pattern source must be a str, got {type(source).__name__}")
    if name is not None and not isinstance(name, str):
        raise PatternTypeError(f"name must be a str (the name of a pattern in the source), got {type(name).__name__}")
    try:
        module = grammar.parse(source, filename)
        pir = check.bind(module, name=name, params=params, source=source)
    except PatternError as err:
        raise err.with_source(source, filename) from None
    return Pattern(pir, source, filename)


def attention(
    q,
    k,
    v,
    pattern: Pattern,
    scale=None,
    return_lse=False,
    backend="auto",
    kv_lengths=None,
    q_lengths=None,
    block_table=None,
    **inputs,
):
    """Attention of ``q`` over ``k``/``v`` restricted to ``pattern``.

    Args:
        q: ``[batch, heads, Lq, head_dim]``.
        k, v: ``[batch, kv_heads, Lk, head_dim]``; ``kv_heads`` divides ``heads`` (grouped-query);
            ``v`` may have a head size of its own, as in SDPA (``out`` then has it).
        pattern: a :class:`Pattern`.
        scale: softmax scale, default ``head_dim ** -0.5``.
        return_lse: also return the log-sum-exp ``[batch, heads, Lq]`` (float32, natural log).
        backend: ``"auto"`` (by device), ``"triton"`` or ``"cpu"``.
        kv_lengths, q_lengths: int tensors ``[batch]`` (LANGUAGE.md section 9): element ``b`` is its
            own problem with ``Lk = kv_lengths[b]``, ``Lq = q_lengths[b]`` (end-aligned); missing
            queries get zeros and ``lse = -inf``.
        block_table: int ``[batch, max_pages]`` for a paged ``k``/``v`` ``[pages, kv_heads,
            page_size, head_dim]`` (needs ``kv_lengths``; ``-1`` marks a page not held).
        **inputs: the pattern's run-time inputs by name (LANGUAGE.md section 7), e.g. ``doc=ids``.

    Returns:
        ``out`` with the dtype of ``q``, or ``(out, lse)``.
    """
    from patterndsl import runtime

    if not isinstance(pattern, Pattern):
        raise PatternError(f"attention() needs a patterndsl.Pattern, got {type(pattern).__name__}")
    if not isinstance(return_lse, bool):
        raise PatternTypeError(f"return_lse must be True or False, got {type(return_lse).__name__}")
    return runtime.attention(
        q,
        k,
        v,
        pattern,
        scale=scale,
        return_lse=return_lse,
        backend=backend,
        inputs=inputs,
        kv_lengths=kv_lengths,
        q_lengths=q_lengths,
        block_table=block_table,
    )


# --------------------------------------------------------------------------- argument checks
# Arguments from Python are checked here, before any stage runs, so that a wrong one is a
# PatternError naming the argument and never a TypeError from deep inside a stage.

ORDERS = ("auto", "identity")


def _integer(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise PatternTypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = value.__index__()
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise PatternValueError(f"{name} must be {bound}, got {value}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        shown = value if isinstance(value, str) else type(value).__name__
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise PatternValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {shown!r}{hint}")
    return value


def _block(block: Any) -> tuple[int, int]:
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise PatternTypeError(f"block must be a pair of tile sizes (BM, BN), got {block!r:.60}")
    return _integer("block[0]", block[0]), _integer("block[1]", block[1])


def _dense_size(q_len: Any, kv_len: Any, heads: Any, q: Any) -> None:
    """Refuse a dense mask too large to build (before the sizes' own checks, which come later)."""
    sizes = [q_len, q_len if kv_len is None else kv_len, heads]
    if q is not None and hasattr(q, "shape") and len(q.shape) == 4:
        sizes.append(q.shape[0])
    if all(hasattr(type(x), "__index__") and not isinstance(x, bool) for x in sizes):
        entries = 1
        for x in sizes:
            entries *= max(x.__index__(), 0)
        if entries > MASK_LIMIT:
            raise PatternValueError(
                f"mask() would build {entries:.3g} entries (at most 2**28): the dense mask is for small sizes; "
                "use plan() or attention at large ones"
            )


def _kernel_options(options: dict) -> None:
    """Check ``kernel_source``'s options by name, type and range (see :meth:`Pattern.kernel_source`)."""
    from patterndsl.codegen.generator import DTYPES, KINDS

    for key, value in options.items():
        if key not in _KERNEL_OPTIONS:
            hint = did_you_mean(key, _KERNEL_OPTIONS)
            raise PatternTypeError(
                f"kernel_source() has no option '{key}'{hint}; its options are {', '.join(_KERNEL_OPTIONS)}"
            )
        if key == "head_dim":
            _integer("head_dim", value, 1, 256)
        elif key == "dtype" and not (isinstance(value, torch.dtype) and value in DTYPES):
            names = ", ".join(f"torch.{n}" for n in DTYPES.values())
            raise PatternValueError(f"dtype must be one of {names}, got {value!r:.60}")
        elif key == "kind":
            _choice("kind", value, KINDS)
        elif key == "order":
            _choice("order", value, ORDERS)
        elif key == "target" and not (isinstance(value, str) and (value == "interpret" or _is_sm(value))):
            raise PatternValueError(f"target must be 'sm_XY' (e.g. 'sm_80', 'sm_90') or 'interpret', got {value!r:.60}")
        elif key == "block" and value is not None:
            _block(value)
        elif key == "kv_heads" and value is not None:
            _integer("kv_heads", value)
        elif key == "num_warps" and value is not None and _integer("num_warps", value, 1, 32) & (value - 1):
            raise PatternValueError(f"num_warps must be a power of two, got {value}")
        elif key == "num_stages" and value is not None:
            _integer("num_stages", value, 1, 8)


_KERNEL_OPTIONS = ("head_dim", "dtype", "target", "block", "kind", "kv_heads", "order", "num_warps", "num_stages")


def _is_sm(target: str) -> bool:
    return target.startswith("sm_") and target[3:].isdigit() and target[3:].isascii()
