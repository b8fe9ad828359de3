"""An independent reference for patterns with run-time inputs: random patterns as source text plus a Python oracle.

Nothing here imports patterndsl's semantics: every term is a plain Python function of one
(batch element, head, query position, key position), written from LANGUAGE.md section 7
(segments are maximal runs of equal values, ``P`` in the segment's own coordinates with
``Lq = Lk =`` its length, end-aligned query positions, clamped indices).
"""

from __future__ import annotations

import random

import torch

DECLS = """    input doc: int[batch, token]
    input tag: int[batch, token]
    input prefix: int[batch]
    input bias: int[head]
    input table: int[6]
"""


def random_documents(rng: random.Random, length: int) -> torch.Tensor:
    """Document ids of ``length`` tokens: random lengths, including length-1 and single-document cases."""
    kind = rng.random()
    if kind < 0.15:
        return torch.zeros(length, dtype=torch.int64)
    ids, doc = [], rng.randint(0, 3)
    while len(ids) < length:
        n = 1 if rng.random() < 0.3 else rng.randint(1, max(1, length // 2))
        ids += [doc] * n
        doc += rng.choice([1, 2, -1])  # ids may repeat later: a later run is a new segment
    return torch.tensor(ids[:length], dtype=torch.int64)


def _segment(ids: list[int], pos: int) -> tuple[int, int]:
    """(start, length) of the run holding ``pos`` (clamped into range)."""
    pos = min(max(pos, 0), len(ids) - 1)
    s = pos
    while s > 0 and ids[s - 1] == ids[pos]:
        s -= 1
    e = pos
    while e + 1 < len(ids) and ids[e + 1] == ids[pos]:
        e += 1
    return s, e - s + 1


def _inner_terms(rng: random.Random):
    """Static terms for within's body: (source, fn(q, k, L))."""
    w, a, n, s = rng.randint(0, 6), rng.randint(0, 3), rng.randint(0, 3), rng.randint(1, 5)
    return rng.choice(
        [
            ("causal", lambda q, k, L: k <= q),
            (f"window({w})", lambda q, k, L: q - w <= k <= q),
            (f"window({w}, {a})", lambda q, k, L: q - w <= k <= q + a),
            (f"sink({n})", lambda q, k, L: k < n),
            (f"blocks({s})", lambda q, k, L: q // s == k // s),
            (f"global({n})", lambda q, k, L: q < n or k < n),
            (f"strided({s})", lambda q, k, L: (q - k) % s == 0),
            ("full", lambda q, k, L: True),
            (f"where(k >= Lk - {n + 1})", lambda q, k, L: k >= L - (n + 1)),
        ]
    )


def _combine(rng, make, depth):
    if depth <= 0 or rng.random() < 0.35:
        return make()
    op = rng.choice(["|", "&", "-", "~"])
    if op == "~":
        src, f = _combine(rng, make, depth - 1)
        return f"~({src})", lambda *x: not f(*x)
    (sa, fa), (sb, fb) = _combine(rng, make, depth - 1), _combine(rng, make, depth - 1)
    fn = {
        "|": lambda *x: fa(*x) or fb(*x),
        "&": lambda *x: fa(*x) and fb(*x),
        "-": lambda *x: fa(*x) and not fb(*x),
    }[op]
    return f"({sa} {op} {sb})", fn


def _outer_term(rng: random.Random):
    """Terms of the whole pattern: (source, fn(b_inputs, h, q, k, Lq, Lk))."""
    kind = rng.randrange(7)
    if kind == 0:
        body, f = _combine(rng, lambda: _inner_terms(rng), 2)

        def within(x, h, q, k, Lq, Lk, f=f):
            sq, nq = _segment(x["doc"], q)
            sk, _ = _segment(x["doc"], k)
            return sq == sk and f(q - sq, k - sq, nq)

        return f"within(doc, {body})", within
    if kind == 1:
        return (
            "where(tag[q] == 1 or tag[k] == 1)",
            lambda x, h, q, k, Lq, Lk: _at(x["tag"], q) == 1 or _at(x["tag"], k) == 1,
        )
    if kind == 2:
        return "where(k < prefix)", lambda x, h, q, k, Lq, Lk: k < x["prefix"]
    if kind == 3:
        return (
            "where(tag[k] != 0 and q >= prefix)",
            lambda x, h, q, k, Lq, Lk: _at(x["tag"], k) != 0 and q >= x["prefix"],
        )
    if kind == 4:
        return "where(table[q - k] == 1)", lambda x, h, q, k, Lq, Lk: _at(x["table"], q - k) == 1
    if kind == 5:
        return (
            "where(q - k <= bias[h] and tag[q] <= tag[k])",
            lambda x, h, q, k, Lq, Lk: q - k <= x["bias"][h] and _at(x["tag"], q) <= _at(x["tag"], k),
        )
    w = rng.randint(0, 5)
    return rng.choice(
        [
            ("causal", lambda x, h, q, k, Lq, Lk: k <= q),
            (f"window({w})", lambda x, h, q, k, Lq, Lk: q - w <= k <= q),
            ("sink(2)", lambda x, h, q, k, Lq, Lk: k < 2),
        ]
    )


def _at(values: list[int], index: int) -> int:
    return values[min(max(index, 0), len(values) - 1)]


def random_pattern_source(rng: random.Random):
    """A random pattern with inputs: ``(source, make_inputs)``; ``make_inputs(rng, Lk, heads) -> dict``.

    The source's oracle is attached to the returned function as ``make_inputs.oracle``.
    """
    body, fn = _combine(rng, lambda: _outer_term(rng), 2)
    source = f"pattern r {{\n{DECLS}    {body}\n}}\n"

    def make_inputs(rng: random.Random, kv_len: int, heads: int, batch: int | None = None) -> dict:
        batch = rng.randint(1, 3) if batch is None else batch
        doc = torch.stack([random_documents(rng, kv_len) for _ in range(batch)])
        tag = (torch.rand(batch, kv_len, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) < 0.15).long()
        prefix = torch.tensor([rng.randint(-1, kv_len + 1) for _ in range(batch)])
        bias = torch.tensor([rng.randint(-2, 6) for _ in range(heads)])
        table = torch.tensor([rng.randint(0, 1) for _ in range(6)])
        return {"doc": doc, "tag": tag, "prefix": prefix, "bias": bias, "table": table}

    make_inputs.oracle = fn
    return source, make_inputs


def reference_mask(fn, inputs: dict, q_len: int, kv_len: int, heads: int) -> torch.Tensor:
    """The oracle's dense mask ``[batch, heads, Lq, Lk]`` (Python loops; small sizes)."""
    batch = inputs["doc"].shape[0]
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        x = {
            "doc": inputs["doc"][b].tolist(),
            "tag": inputs["tag"][b].tolist(),
            "prefix": int(inputs["prefix"][b]),
            "bias": inputs["bias"].tolist(),
            "table": inputs["table"].tolist(),
        }
        for h in range(heads):
            for i in range(q_len):
                q = i + kv_len - q_len
                for k in range(kv_len):
                    out[b, h, i, k] = bool(fn(x, h, q, k, q_len, kv_len))
    return out
