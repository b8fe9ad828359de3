"""Test oracle: the meaning of a pattern, one (head, query, key) triple at a time.

Written straight from ../shared/LANGUAGE.md with plain Python ints and loops,
independently of ``patterndsl.semantics`` (it must never import it), so that
every fast implementation can be compared against it at small sizes.
Comes in: a bound ``ir.PatternIR`` (or node) and sizes. Goes out: nested lists
or a bool tensor ``[heads, Lq, Lk]``.
"""

from __future__ import annotations

import torch

from patterndsl import ir

M64 = 2**64


def splitmix_next(state):
    """One step of splitmix64: returns ``(new_state, output)``."""
    state = (state + 0x9E3779B97F4A7C15) % M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    return state, z ^ (z >> 31)


def drawn_blocks(seed, qblock, n_key_blocks, count):
    """The documented generator of ``random(count, block, seed)`` for one query block."""
    state = (seed * 0x2545F4914F6CDD1D + qblock * 0x9E3779B97F4A7C15) % M64
    r = min(count, n_key_blocks)
    chosen = []
    for jj in range(n_key_blocks - r, n_key_blocks):
        state, z = splitmix_next(state)
        t = z % (jj + 1)
        if t in chosen:
            chosen.append(jj)
        else:
            chosen.append(t)
    return sorted(chosen)


def coords(pos, layout):
    """Row-major grid coordinates of a flattened position, last axis fastest."""
    out = []
    for extent in reversed(layout.shape):
        out.append(pos % extent)
        pos //= extent
    return list(reversed(out))


def neighborhood_1d(x, y, n, s, d, r, causal):
    """LANGUAGE.md section 6, literally."""
    if x % d != y % d:
        return False
    g = x % d
    p, t = x // d, y // d
    m = -(-(n - g) // d)
    if causal:
        lead = min((p // r) * r + r - 1, m - 1)
        return t <= p and lead - t < s
    left = s // 2
    right = s // 2 + (s % 2 - 1)
    lead = min((p // r) * r + r // 2, m - 1)
    c = min(max(lead, left), m - 1 - right)
    return c - left <= t <= c + right


def expr(e, env):
    """A where-expression on Python ints."""
    if isinstance(e, ir.Const):
        return e.value
    if isinstance(e, ir.Var):
        return env[e.name]
    if isinstance(e, ir.Coord):
        layout = env["layout"]
        return coords(env[e.side], layout)[layout.names.index(e.axis)]
    if isinstance(e, ir.Arith):
        a, b = expr(e.left, env), expr(e.right, env)
        return {"+": a + b, "-": a - b, "*": a * b, "//": a // b if b else None, "%": a % b if b else None}[e.op]
    if isinstance(e, ir.Neg):
        return -expr(e.operand, env)
    if isinstance(e, ir.Func):
        return {"abs": abs, "min": min, "max": max}[e.fn](*[expr(a, env) for a in e.args])
    if isinstance(e, ir.Cmp):
        a, b = expr(e.left, env), expr(e.right, env)
        return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[e.op]
    if isinstance(e, ir.Logic):
        vals = [expr(x, env) for x in e.items]
        return all(vals) if e.op == "and" else any(vals)
    if isinstance(e, ir.LNot):
        return not expr(e.operand, env)
    raise TypeError(e)


def allowed(node, q, k, h, Lq, Lk, layout):
    """Whether position ``q`` may attend to position ``k`` at head ``h``."""
    if isinstance(node, ir.Union):
        return any(allowed(x, q, k, h, Lq, Lk, layout) for x in node.items)
    if isinstance(node, ir.Inter):
        return all(allowed(x, q, k, h, Lq, Lk, layout) for x in node.items)
    if isinstance(node, ir.Not):
        return not allowed(node.item, q, k, h, Lq, Lk, layout)
    a = node.kwargs
    name = node.name
    if name == "full":
        return True
    if name == "empty":
        return False
    if name == "causal":
        return k <= q
    if name == "window":
        d = a["dilation"]
        return (q - k) % d == 0 and q - a["before"] * d <= k <= q + a["after"] * d
    if name == "strided":
        return (q - k) % a["stride"] == 0
    if name == "blocks":
        return q // a["size"] == k // a["size"]
    if name == "summary":
        return k % a["stride"] >= a["stride"] - a["width"]
    if name == "sink":
        return k < a["n"]
    if name == "global":
        return q < a["n"] or k < a["n"]
    if name == "landmarks":
        return k % a["every"] == a["every"] - 1
    if name == "random":
        n_key_blocks = -(-Lk // a["block"])
        return k // a["block"] in drawn_blocks(a["seed"], q // a["block"], n_key_blocks, a["blocks"])
    if name == "where":
        env = {"q": q, "k": k, "h": h, "Lq": Lq, "Lk": Lk, "layout": layout}
        return bool(expr(a["pred"], env))
    if name == "neighborhood":
        rank = len(layout.shape)

        def per_axis(v):
            return v if isinstance(v, tuple) else (v,) * rank

        sizes, dils, strides, causals = (per_axis(a[x]) for x in ("size", "dilation", "stride", "causal"))
        xs, ys = coords(q, layout), coords(k, layout)
        return all(
            neighborhood_1d(xs[ax], ys[ax], layout.shape[ax], sizes[ax], dils[ax], strides[ax], causals[ax])
            for ax in range(rank)
        )
    raise ValueError(f"brute force has no rule for {name}")


def brute_node(node, Lq, Lk, h=0, layout=None):
    """``[Lq][Lk]`` nested lists of bools for one head."""
    off = Lk - Lq
    return [[allowed(node, i + off, j, h, Lq, Lk, layout) for j in range(Lk)] for i in range(Lq)]


def brute_mask(pir, Lq, Lk=None, heads=1):
    """Bool tensor ``[heads, Lq, Lk]`` of a bound pattern, one element at a time."""
    Lk = Lq if Lk is None else Lk
    out = []
    for h in range(heads):
        node = pir.node_for_head(h)
        if node is None:
            raise ValueError(f"head {h} not covered")
        out.append(brute_node(node, Lq, Lk, h, pir.layout))
    return torch.tensor(out, dtype=torch.bool).reshape(heads, Lq, Lk)


def prim(name, *args, **kwargs):
    """Build an ``ir.Prim`` by hand, arguments in ``ir.SIGNATURES`` order with defaults filled in.

    ``route``'s ``qblock`` defaults to its ``block``, as binding does.
    """
    sig = ir.SIGNATURES[name]
    values = dict(zip((p.name for p in sig), args, strict=False))
    values.update(kwargs)
    filled = []
    for p in sig:
        if p.name in values:
            filled.append((p.name, values[p.name]))
        elif p.required:
            raise TypeError(f"{name} needs {p.name}")
        elif name == "route" and p.name == "qblock":
            filled.append((p.name, values.get("block", 64)))
        else:
            filled.append((p.name, p.default))
    return ir.Prim(name, tuple(filled))


def pattern(node, layout=None, heads=()):
    """Wrap a node into an ``ir.PatternIR``; ``layout`` is a dict axis -> extent, ``heads`` (lo, hi, node) triples."""
    lay = ir.Layout(tuple(layout.items())) if layout else None
    rules = tuple(ir.HeadRule(lo, hi, n) for lo, hi, n in heads)
    return ir.PatternIR("p", (), lay, rules, node)
