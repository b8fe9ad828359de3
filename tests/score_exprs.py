"""Test oracle for score modifiers: random score expressions as pattern-language text and as torch code.

Comes in: a ``random.Random`` and the layout axes. Goes out: ``(dsl, py)`` pairs, the same
expression as score source text and as a Python expression over torch (evaluated by
:func:`python_score`, written independently of ``patterndsl.scores``), so property tests can
compare the executors against a float64 reference that shares no code with the library.
"""

from __future__ import annotations

import random

import torch

F64 = torch.float64


def _const(rng: random.Random) -> tuple[str, str]:
    value = round(rng.uniform(-2.0, 2.0), 3)
    text = f"{abs(value)!r}"
    if "." not in text:
        text += ".0"
    dsl = f"(-{text})" if value < 0 else text
    return dsl, f"F({dsl})"


def float_expr(rng: random.Random, depth: int, axes) -> tuple[str, str]:
    if depth <= 0 or rng.random() < 0.2:
        return rng.choice([("s", "s"), ("s", "s"), _const(rng), _promoted(rng, 0, axes)])
    a = lambda: float_expr(rng, depth - 1, axes)  # noqa: E731
    kind = rng.randrange(15)
    if kind == 0:
        (x, px), (y, py) = a(), a()
        op = rng.choice(["+", "-", "*"])
        return f"({x} {op} {y})", f"({px} {op} {py})"
    if kind == 1:
        (x, px), (y, py) = a(), a()
        return f"(({x}) / (1.5 + abs({y})))", f"({px} / (1.5 + torch.abs(T({py}))))"
    if kind in (2, 3):
        fn = rng.choice(["tanh", "erf", "abs"])
        x, px = a()
        return f"{fn}({x})", f"torch.{fn}(T({px}))"
    if kind == 4:
        x, px = a()
        return f"exp(tanh({x}))", f"torch.exp(torch.tanh(T({px})))"
    if kind == 5:
        x, px = a()
        return f"log(1.0 + abs({x}))", f"torch.log(1.0 + torch.abs(T({px})))"
    if kind == 6:
        x, px = a()
        return f"sqrt(1.0 + ({x}) * ({x}))", f"torch.sqrt(1.0 + T({px}) * T({px}))"
    if kind == 7:
        (x, px), (y, py) = a(), a()
        fn = rng.choice(["min", "max"])
        return f"{fn}({x}, {y})", f"torch.{'minimum' if fn == 'min' else 'maximum'}(T({px}), T({py}))"
    if kind == 8:
        (c, pc), (x, px), (y, py) = pred(rng, depth - 1, axes), a(), a()
        return f"select({c}, {x}, {y})", f"torch.where(T({pc}), T({px}), T({py}))"
    if kind == 9:
        x, px = a()
        return f"({x}) ** 2", f"torch.pow(T({px}), 2.0)"
    if kind == 10:
        x, px = a()
        return f"(2.0 ** tanh({x}))", f"torch.pow(F(2.0), torch.tanh(T({px})))"
    if kind == 11:
        x, px = a()
        return f"(3.0 * tanh(({x}) / 3.0))", f"(3.0 * torch.tanh(T({px}) / 3.0))"
    if kind == 12:
        x, px = a()
        return f"(-({x}))", f"(-T({px}))"
    if kind == 13:
        x, px = a()
        return f"({x} + s)", f"({px} + s)"
    return _promoted(rng, depth - 1, axes)


def _promoted(rng, depth, axes) -> tuple[str, str]:
    x, px = int_expr(rng, depth, axes)
    return f"(0.05 * ({x}))", f"(F(0.05) * T({px}))"


def int_expr(rng: random.Random, depth: int, axes) -> tuple[str, str]:
    atoms = [("q", "q"), ("k", "k"), ("h", "h"), ("Lq", "Lq"), ("Lk", "Lk"), (str(rng.randint(0, 9)), None)]
    atoms += [(f"{side}.{axis}", f"C('{side}', '{axis}')") for side in "qk" for axis in axes]
    if depth <= 0 or rng.random() < 0.3:
        dsl, py = rng.choice(atoms)
        return dsl, (f"I({dsl})" if py is None else py)
    a = lambda: int_expr(rng, depth - 1, axes)  # noqa: E731
    kind = rng.randrange(8)
    if kind == 0:
        (x, px), (y, py) = a(), a()
        op = rng.choice(["+", "-"])
        return f"({x} {op} {y})", f"({px} {op} {py})"
    if kind == 1:
        x, px = a()
        return f"({x} * 2)", f"({px} * 2)"
    if kind == 2:
        x, px = a()
        c = rng.randint(1, 5)
        return f"({x} // {c})", f"torch.div(T({px}), {c}, rounding_mode='floor')"
    if kind == 3:
        x, px = a()
        c = rng.randint(1, 5)
        return f"({x} % {c})", f"torch.remainder(T({px}), {c})"
    if kind == 4:
        x, px = a()
        return f"abs({x})", f"torch.abs(T({px}))"
    if kind == 5:
        (x, px), (y, py) = a(), a()
        fn = rng.choice(["min", "max"])
        return f"{fn}({x}, {y})", f"torch.{'minimum' if fn == 'min' else 'maximum'}(T({px}), T({py}))"
    if kind == 6:
        x, px = float_expr(rng, depth - 1, axes)
        return f"floor({x})", f"torch.floor(T({px})).long()"
    (c, pc), (x, px), (y, py) = pred(rng, depth - 1, axes), a(), a()
    return f"select({c}, {x}, {y})", f"torch.where(T({pc}), T({px}), T({py}))"


def pred(rng: random.Random, depth: int, axes) -> tuple[str, str]:
    kind = rng.randrange(5 if depth > 0 else 2)
    if kind == 0:
        (x, px), (y, py) = int_expr(rng, depth, axes), int_expr(rng, depth, axes)
        op = rng.choice(["<", "<=", "==", "!=", ">", ">="])
        return f"{x} {op} {y}", f"(T({px}) {op} T({py}))"
    if kind == 1:
        (x, px), (y, py) = float_expr(rng, depth, axes), float_expr(rng, depth, axes)
        return f"{x} > {y}", f"(T({px}) > T({py}))"
    if kind == 4:
        x, px = pred(rng, depth - 1, axes)
        return f"not ({x})", f"(~T({px}))"
    (x, px), (y, py) = pred(rng, depth - 1, axes), pred(rng, depth - 1, axes)
    word, op = ("and", "&") if kind == 2 else ("or", "|")
    return f"({x}) {word} ({y})", f"(T({px}) {op} T({py}))"


def python_score(py: str, layout=None):
    """``f(s, q, k, h, Lq, Lk)`` evaluating the torch text ``py`` (``s`` float64, positions int64)."""

    def fn(s, q, k, h, lq, lk):
        def coord(side: str, axis: str):
            pos = q if side == "q" else k
            stride = 1
            for name, extent in reversed(layout):
                if name == axis:
                    return torch.div(pos, stride, rounding_mode="floor") % extent
                stride *= extent
            raise KeyError(axis)

        env = {
            "torch": torch,
            "s": s,
            "q": q,
            "k": k,
            "h": h,
            "Lq": torch.tensor(lq),
            "Lk": torch.tensor(lk),
            "F": lambda x: torch.tensor(x, dtype=F64),
            "I": lambda x: torch.tensor(x, dtype=torch.int64),
            "T": torch.as_tensor,
            "C": coord,
        }
        out = eval(py, env)  # the test's own text, built above
        return torch.as_tensor(out).to(F64).expand(s.shape)

    return fn
