"""Hugging Face ``transformers`` integration: ``attn_implementation=name`` runs patterndsl.

``register(name, pattern=None)`` registers an attention function and a mask function under
``name`` (both are needed: ``transformers`` hands ``mask=None`` to an attention implementation
that has no mask function, which silently drops padding).

How a call maps onto patterndsl (LANGUAGE.md sections 7, 9, 10):

- The mask function returns no ``Lq x Lk`` mask but a bool tensor ``[batch, Lq + Lk]``: which
  queries and which keys are real tokens (padding, and static-cache slots not written yet, are
  not). When the model gave neither a 2-D mask nor a cache (training on packed sequences), it is
  an int8 tensor instead, and the attention function reads documents from ``position_ids``.
- A padded prefill (as many keys as queries) runs as one call of ``within(doc, P)`` whose ``doc``
  is the validity of each token: a row's run of real tokens is a document whose position 0 is its
  first real token (a run of padding is one too; its queries' outputs are zeros, as with sdpa). Packed
  documents go through the same ``within(doc, P)`` with ``doc`` numbered from ``position_ids``
  restarts.
- Otherwise (decoding over a padded cache, a static cache's unwritten slots, a pattern that cannot
  sit inside ``within``), the attention function moves each row's real keys and queries to the
  front with one stable gather (no loop over rows), calls :func:`patterndsl.attention` with
  ``kv_lengths`` / ``q_lengths`` (each element an end-aligned problem whose position 0 is its first
  real token), and scatters the outputs back; padded queries get zeros.
- Run-time inputs the pattern declares are keyword arguments of the model's ``forward`` (they reach
  the attention function in its ``kwargs``); padding with them is refused with a PatternError by the
  ragged path (lengths do not combine with inputs yet).
- The pattern of a layer: the given one (a Pattern, text, or a mapping / callable from the layer
  index or ``layer_type``), else ``causal`` or ``causal & window(w - 1)`` for a layer with
  ``sliding_window = w``.
- ``config.patterndsl`` holds ``{"name", "layers"}`` (each layer's pattern source, or None for the
  config's default), so ``save_pretrained`` / ``from_pretrained`` restore the implementation once
  this module is imported.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from patterndsl import ir
from patterndsl.api import Pattern, attention, compile
from patterndsl.errors import PatternError
from patterndsl.integrations.hf_cache import EAGER_REASON, PatternCache, commit
from patterndsl.nn import as_pattern
from patterndsl.runtime import heads_last
from patterndsl.runtime.cpu import dense

__all__ = [
    "PatternCache",
    "default_pattern",
    "layer_pattern",
    "layer_patterns",
    "prepare",
    "register",
    "twins",
    "with_softcap",
]

#: name -> the pattern spec given to register (Pattern, source, mapping, callable or None).
_REGISTERED: dict[str, Any] = {}
#: the input that numbers packed documents in a wrapped pattern.
_DOC = "pdsl_doc"
#: Query rows up to which a call over a longer cache runs as decoding (LANGUAGE.md section 9's "Lq up to 16").
DECODE_ROWS = 16


def register(name: str, pattern=None) -> None:
    """Make ``attn_implementation=name`` use patterndsl in ``transformers`` models.

    Args:
        name: the implementation's name (not one of ``transformers``' own).
        pattern: a :class:`Pattern`, source text, a mapping from layer index or ``layer_type`` to
            one, a callable ``(layer_idx, layer_type) -> pattern`` (or ``(layer_idx) -> pattern``;
            None from it keeps the layer's own), or None for each layer's own
            (``causal``, ``causal & window(w - 1)`` for ``sliding_window = w``).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name:
        raise PatternError(f"register: name must be a non-empty str, got {name!r}")
    if name in ("sdpa", "eager", "flex_attention") or name.startswith("flash"):
        raise PatternError(f"register: {name!r} is one of transformers' own implementations; choose another name")
    if isinstance(pattern, (Pattern, str)):
        pattern = as_pattern(pattern)
    elif pattern is not None and not isinstance(pattern, Mapping) and not callable(pattern):
        raise PatternError(
            f"register: pattern must be a Pattern, source text, a mapping or a callable, got {type(pattern).__name__}"
        )
    _install_hooks()
    _REGISTERED[name] = pattern
    AttentionInterface.register(name, _attention_forward)
    AttentionMaskInterface.register(name, _mask)


# --------------------------------------------------------------------------- per-layer patterns


def default_pattern(config, layer_idx: int) -> Pattern:
    """The pattern a layer's config describes: ``causal``, or ``causal & window(w - 1)``."""
    kind = _layer_type(config, layer_idx)
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and (kind is None or kind == "sliding_attention")
    if sliding:
        return compile(f"pattern sliding_{window}(w = {window}) {{ causal & window(w - 1) }}")
    return compile("pattern causal_lm { causal }")


def layer_pattern(name: str, config, layer_idx: int) -> Pattern:
    """The pattern implementation ``name`` uses for layer ``layer_idx`` of a model with ``config``."""
    stored = getattr(config, "patterndsl", None)
    if isinstance(stored, dict) and stored.get("name") == name and stored.get("layers") is not None:
        layers = stored["layers"]
        if layer_idx < len(layers) and layers[layer_idx] is not None:
            return compile(layers[layer_idx])
    if name not in _REGISTERED:
        raise PatternError(f"attention implementation {name!r} is not registered with patterndsl")
    spec = _REGISTERED[name]
    kind = _layer_type(config, layer_idx)
    if spec is None:
        return default_pattern(config, layer_idx)
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, Mapping):
        for key in (layer_idx, kind):
            if key is not None and key in spec:
                return as_pattern(spec[key])
        raise PatternError(
            f"register({name!r}): the pattern mapping has no entry for layer {layer_idx} (layer_type {kind!r})"
        )
    chosen = spec(layer_idx, kind) if _takes_two(spec) else spec(layer_idx)
    return default_pattern(config, layer_idx) if chosen is None else as_pattern(chosen)


def _takes_two(fn) -> bool:
    """Whether a pattern callable takes ``(layer_idx, layer_type)``; one of a single argument gets the index."""
    import inspect

    try:
        inspect.signature(fn).bind(0, None)
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (some builtins): the documented two arguments
        return True
    return True


def with_softcap(pattern: Pattern, cap: float) -> Pattern:
    """``pattern`` with ``score cap * tanh(s / cap)`` (Gemma 2's attention softcap)."""
    if pattern.ir.score is not None:
        raise PatternError(f"pattern {pattern.name!r} already has a score; it would replace the softcap")
    text = str(pattern).rstrip()
    cap = float(cap)
    return compile(f"{text[:-1].rstrip()}\n    score {cap!r} * tanh(s / {cap!r})\n}}")


def twins(config, name: str, other: str = "sdpa", seed: int = 0):
    """The same randomly initialised causal LM twice: under ``attn_implementation=name`` and ``other``.

    Both models are built from copies of ``config`` (``from_config``: nothing is downloaded), the
    second loads the first's weights, and both are returned in eval mode, so any difference in their
    outputs comes from the attention implementations alone.

    Args:
        config: a ``transformers`` model config.
        name: the implementation under test (a name given to :func:`register`).
        other: the reference implementation (``"sdpa"``, ``"eager"``).
        seed: ``torch.manual_seed`` before the first model is initialised.

    Returns:
        ``(ours, theirs)``.
    """
    import copy

    import transformers

    torch.manual_seed(seed)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name).eval()
    theirs = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=other).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _layer_type(config, layer_idx: int):
    types = getattr(config, "layer_types", None)
    return types[layer_idx] if types is not None and layer_idx < len(types) else None


def _with_documents(pattern: Pattern) -> Pattern | None:
    """``within(pdsl_doc, P)``, or None when ``P`` cannot sit inside ``within``."""
    pir = pattern.ir
    if pir.layout is not None or pir.heads or pir.default is None or pattern.is_dynamic or pir.inputs:
        return None  # (within cannot read a run-time input inside its pattern)
    if any(isinstance(n, ir.Prim) and n.name == "within" for n in ir.walk(pir.default)):
        return None
    body = ir.Prim("within", (("seg", _DOC), ("body", pir.default)))
    decl = ir.InputDecl(_DOC, "int", ("batch", "token"))
    wrapped = dataclasses.replace(pir, default=body, inputs=(*pir.inputs, decl))
    return compile(str(Pattern(wrapped)))


@dataclasses.dataclass(frozen=True)
class _LayerPatterns:
    plain: Pattern
    packed: Pattern | None

    def fused_step(self, q_len: int) -> bool:
        """Whether a decoding step of ``q_len`` queries runs as one fused kernel call on the whole cache
        (plain ``causal`` / ``full``, one query: every key is seen; runtime/cpu/dense.py)."""
        return q_len == 1 and dense.plain(self.plain.ir) is not None


def prepare(model) -> None:
    """Resolve every attention layer's pattern now (done when a model is built or its implementation
    set; a traced forward must not parse patterns)."""
    name = model.config._attn_implementation
    if name not in _REGISTERED:
        return
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx") and hasattr(module, "config"):
            _resolve(module)


def layer_patterns(model) -> list[Pattern]:
    """Each attention layer's pattern, in layer order (for :class:`~patterndsl.integrations.hf_cache.PatternCache`)."""
    prepare(model)
    found = {m.layer_idx: m._patterndsl_patterns.plain for m in model.modules() if hasattr(m, "_patterndsl_patterns")}
    if not found:
        raise PatternError(
            f"the model does not run a patterndsl attention implementation ({model.config._attn_implementation!r})"
        )
    return [found[i] for i in sorted(found)]


def _patterns(module) -> _LayerPatterns:
    found = getattr(module, "_patterndsl_patterns", None)
    if found is None:
        if torch.compiler.is_compiling():
            raise PatternError(
                "the patterndsl attention layers were not prepared before torch.compile: call "
                "patterndsl.integrations.transformers.prepare(model) first"
            )
        found = _resolve(module)
    return found


def _resolve(module) -> _LayerPatterns:
    config = module.config
    pattern = layer_pattern(config._attn_implementation, config, module.layer_idx)
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap and pattern.ir.score is None:
        pattern = with_softcap(pattern, cap)
    found = _LayerPatterns(pattern, _with_documents(pattern))
    module._patterndsl_patterns = found
    return found


# --------------------------------------------------------------------------- mask and attention


def _mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    attention_mask: torch.Tensor | None = None,
    device="cpu",
    **kwargs,
) -> torch.Tensor:
    """Which queries and keys are real tokens, ``[batch, q_length + kv_length]`` (see the module doc)."""
    if attention_mask is None and isinstance(q_offset, int) and q_offset == 0 and kv_length == q_length:
        # no padding and no cache: the attention reads packed documents from position_ids
        return torch.ones(batch_size, q_length + kv_length, dtype=torch.int8, device=device)
    positions = torch.arange(kv_length, device=device) + kv_offset
    valid_k = (positions < q_offset + q_length).expand(batch_size, kv_length)
    valid_q = torch.ones(batch_size, q_length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        given = attention_mask.to(device=device, dtype=torch.bool)
        n = given.shape[-1]
        valid_k = valid_k & given[:, positions.clamp(max=n - 1)] & (positions < n)
        valid_q = _real_queries(given, q_length, q_offset, device)
    return torch.cat((valid_q, valid_k), dim=1)


def _real_queries(attention_mask, q_length, q_offset, device):
    given = attention_mask.to(device=device, dtype=torch.bool)
    n = given.shape[-1]
    qpos = torch.arange(q_length, device=device) + q_offset
    return given[:, qpos.clamp(max=n - 1)] & (qpos < n)


def _attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    found = _patterns(module)
    _refuse(module, dropout, softcap, found.plain, attention_mask)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    # run-time inputs the pattern declares arrive as keyword arguments of the model's forward
    inputs = {d.name: kwargs[d.name] for d in found.plain.ir.inputs if d.name in kwargs}
    if key.dim() == 5:  # a PatternCache layer's pending keys (hf_cache)
        out = _paged(query, key, value, found.plain, scaling, attention_mask)
    elif attention_mask is None:
        return heads_last(query, key, value, found.plain, scale=scaling, **inputs), None
    elif attention_mask.dtype != torch.bool:
        if position_ids is None or found.packed is None:
            return heads_last(query, key, value, found.plain, scale=scaling, **inputs), None
        else:
            starts = _per_forward(position_ids, lambda: _restarts(position_ids.expand(batch, q_len)))
            if _eager_and(lambda: not bool(starts[:, 1:].any())):
                return heads_last(query, key, value, found.plain, scale=scaling), None  # one document per row
            else:
                doc = _per_forward(starts, lambda: starts.cumsum(1, dtype=torch.int32))
                out = attention(query, key, value, found.packed, scale=scaling, **{_DOC: doc})
    elif (lengths := _all_real(attention_mask, kv_len)) is not None:  # no padding, every key written
        if q_len < kv_len and q_len <= DECODE_ROWS and not found.plain.ir.inputs and not found.fused_step(q_len):
            # decoding: the ragged path reads only the keys the pattern lets these queries see and plans
            # per row tile (LANGUAGE.md section 9); the dense plan would tile every key for one query
            # (plain causal / full steps of one query are one fused call on the whole cache instead)
            out = attention(query, key, value, found.plain, scale=scaling, kv_lengths=lengths)
        else:
            return heads_last(query, key, value, found.plain, scale=scaling, **inputs), None
    elif q_len == kv_len and found.packed is not None:
        # a prefill: each row's runs of real tokens and of padding are documents; one call for the batch,
        # nothing gathered (its keys are its queries' own, so valid_k is valid_q); padded queries get
        # zeros, as sdpa gives them (a causal LM's loss reads the last padded position's logits)
        valid = attention_mask[:, q_len:]
        doc = _per_forward(attention_mask, lambda: valid.to(torch.int32), "doc")
        out = attention(query, key, value, found.packed, scale=scaling, **{_DOC: doc})
        out = out.masked_fill(~valid[:, None, :, None], 0.0)
    else:
        valid_q, valid_k = attention_mask[:, :q_len], attention_mask[:, q_len:]
        k_order = torch.argsort((~valid_k).to(torch.int8), dim=1, stable=True)
        key, value = _take_rows(key, k_order), _take_rows(value, k_order)
        kv_lengths = valid_k.sum(1, dtype=torch.int32)
        if _eager_and(lambda: bool(valid_q.all())):  # decoding: every new token is real
            out = attention(query, key, value, found.plain, scale=scaling, kv_lengths=kv_lengths)
        else:
            q_order = torch.argsort((~valid_q).to(torch.int8), dim=1, stable=True)
            q_lengths = valid_q.sum(1, dtype=torch.int32)
            out = attention(
                _take_rows(query, q_order),
                key,
                value,
                found.plain,
                scale=scaling,
                q_lengths=q_lengths,
                kv_lengths=kv_lengths,
            )
            out = _take_rows(out, torch.argsort(q_order, dim=1))
    return out.transpose(1, 2).contiguous(), None


def _restarts(pos: torch.Tensor) -> torch.Tensor:
    """1 where a row's ``position_ids`` do not continue the previous position (a packed document starts)."""
    starts = torch.ones_like(pos, dtype=torch.int32)
    starts[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).to(torch.int32)
    return starts


#: what was derived last from each source tensor: ``(id(source), tag) -> (weakref, version, derived)``.
_DERIVED: dict[tuple, tuple] = {}


def _all_real(attention_mask: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """``kv_lengths`` (int64, every element ``kv_len``) when the mask marks every query and key real, else
    None; decided once per forward (every layer gets the same mask) and never under tracing."""
    if torch.compiler.is_compiling():
        return None

    def make():
        if not bool(attention_mask.all()):
            return None
        return torch.full((attention_mask.shape[0],), kv_len, dtype=torch.int64, device=attention_mask.device)

    return _per_forward(attention_mask, make, ("all", kv_len))


def _per_forward(source: torch.Tensor, make, tag=None):
    """``make()``, the same object for every layer of an eager forward that passes the same ``source``
    (a mask or ``position_ids``) and ``tag`` (what is derived): the call-time plan of a run-time input is
    kept per input tensor (:mod:`patterndsl.runtime.inputs`), so the first layer's plan serves the others."""
    if torch.compiler.is_compiling():
        return make()
    kept = _DERIVED.get((id(source), tag))
    if kept is not None and kept[0]() is source and kept[1] == source._version:
        return kept[2]
    derived = make()
    if len(_DERIVED) > 8:
        _DERIVED.clear()
    _DERIVED[(id(source), tag)] = (weakref.ref(source), source._version, derived)
    return derived


def _take_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b, h, order[b, i]]`` for ``x`` ``[batch, heads, n, d]`` and ``order`` ``[batch, n]``: whole rows
    selected through one flat index (four times faster than ``gather`` with an index per element)."""
    batch, heads, n, d = x.shape
    base = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * n
    return x.reshape(-1, d).index_select(0, (order[:, None, :] + base).reshape(-1)).view(x.shape)


def _eager_and(test) -> bool:
    """``test()`` outside tracing; False under torch.compile (a shortcut that reads data, never
    taken in a traced forward, which always runs the general path)."""
    return not torch.compiler.is_compiling() and test()


@torch.compiler.disable(reason=EAGER_REASON)
def _paged(query, handle, values, pattern, scaling, attention_mask):
    """Attention over a :class:`PatternCache` layer's pages after appending the step's real tokens;
    real queries first, then back in place. Eager under torch.compile (the page bookkeeping is Python)."""
    batch, q_len = query.shape[0], query.shape[2]
    if attention_mask is None:
        valid_q = torch.ones(batch, q_len, dtype=torch.bool, device=query.device)
    else:
        valid_q = attention_mask[:, :q_len].bool()
    key, value, block_table, kv_lengths = commit(handle, valid_q)
    q_order = torch.argsort((~valid_q).to(torch.int8), dim=1, stable=True)
    out = attention(
        _take_rows(query, q_order),
        key,
        value,
        pattern,
        scale=scaling,
        q_lengths=valid_q.sum(1, dtype=torch.int32),
        kv_lengths=kv_lengths,
        block_table=block_table,
    )
    return _take_rows(out, torch.argsort(q_order, dim=1))


def _refuse(module, dropout, softcap, pattern: Pattern, attention_mask) -> None:
    """PatternErrors for what the integration does not implement (never a silent difference)."""
    if module.training and dropout:
        raise PatternError(
            f"attention dropout ({dropout}) is not implemented by patterndsl: set the config's "
            "attention_dropout to 0.0 or call model.eval()"
        )
    if softcap and pattern.ir.score is None:
        raise PatternError(
            f"the config's attention softcap ({softcap}) needs a pattern with a score modifier; "
            f"pattern {pattern.name!r} has none"
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        raise PatternError(
            "an explicit 4-D attention mask cannot be expressed by patterndsl; pass a 2-D padding mask "
            "(or position_ids for packed sequences), or put the mask in the pattern"
        )
    # transformers' collector is a context variable that torch.compile can read (CompileableContextVar)
    from transformers.utils.output_capturing import _active_collector

    collecting = _active_collector.get()
    if collecting and "attentions" in collecting:
        raise PatternError(
            "output_attentions is not supported by patterndsl (it never forms attention weights); "
            "use attn_implementation='eager' to inspect them"
        )


# --------------------------------------------------------------------------- config round trip


_HOOKED = False


def _install_hooks() -> None:
    """Wrap ``PreTrainedModel`` so a model built or loaded with a patterndsl implementation stores
    (and, after ``from_pretrained``, restores) its name and per-layer patterns in the config."""
    global _HOOKED
    if _HOOKED:
        return
    from transformers import PreTrainedModel

    original = PreTrainedModel._check_and_adjust_attn_implementation

    def check(self, attn_implementation, *args, **kwargs):
        stored = getattr(self.config, "patterndsl", None)
        if attn_implementation is None and isinstance(stored, dict) and "name" in stored:
            attn_implementation = stored["name"]
            if attn_implementation not in _REGISTERED:
                register(attn_implementation)
        if attn_implementation in _REGISTERED:
            _store(self.config, attn_implementation)
            return attn_implementation
        return original(self, attn_implementation, *args, **kwargs)

    PreTrainedModel._check_and_adjust_attn_implementation = check
    post_init, set_implementation = PreTrainedModel.post_init, PreTrainedModel.set_attn_implementation

    def post_init_then_prepare(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        prepare(self)

    def set_then_prepare(self, *args, **kwargs):
        set_implementation(self, *args, **kwargs)
        prepare(self)

    PreTrainedModel.post_init = post_init_then_prepare
    PreTrainedModel.set_attn_implementation = set_then_prepare
    _HOOKED = True


def _store(config, name: str) -> None:
    stored = getattr(config, "patterndsl", None)
    if isinstance(stored, dict) and stored.get("name") == name:
        return
    spec = _REGISTERED[name]
    layers = None
    if spec is not None:
        count = getattr(config, "num_hidden_layers", None)
        if count is None:
            raise PatternError(f"register({name!r}): the model config has no num_hidden_layers to store patterns for")
        layers = [str(layer_pattern(name, config, i)) for i in range(count)]
    config.patterndsl = {"name": name, "layers": layers}


# Importing this module is enough for from_pretrained to restore a saved patterndsl implementation.
_install_hooks()
