"""Stage 1 of the pipeline: source text -> syntax tree.

Comes in: pattern-language source text (and its file name, for messages).
Goes out: a :class:`~patterndsl.grammar.syntax.Module` whose nodes carry
source spans, or a :class:`~patterndsl.errors.PatternSyntaxError` that names
``FILE:LINE:COLUMN``, says in words what was expected and shows a caret.
The grammar lives in ``pattern.lark`` (LALR); a small post-lexer decides
which line breaks end a statement, and a lark Transformer builds the tree.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from patterndsl.errors import PatternError, PatternSyntaxError
from patterndsl.grammar import syntax
from patterndsl.ir import Span

__all__ = ["parse", "syntax"]

_STATEMENT_KEYWORDS = frozenset({"LET", "LAYOUT", "HEADS", "INPUT", "SCORE"})
#: After these (at parenthesis depth 0) the name ``score`` starts a score statement: where a statement
#: may start, or right after a complete final expression. Anywhere else it stays a name
#: (``route(score = mean)``, a parameter called ``score``).
_BEFORE_SCORE = frozenset({"LBRACE", "SEMI", "NEWLINE", "RPAR", "NAME", "INT", "FLOAT", "TRUE", "FALSE", "RSQB"})
#: How deep parentheses and prefix operators (``~ - not``) may nest. Every stage walks the tree
#: recursively; this keeps them all far from Python's recursion limit, and no pattern a person
#: writes comes near it (a flat chain ``a | b | c ...`` is not nesting and has no limit).
MAX_NESTING = 64
_PREFIX = frozenset({"TILDE", "MINUS", "NOT"})
#: After these a ``-`` is binary; anywhere else it is a prefix minus.
_OPERAND_END = frozenset({"NAME", "INT", "FLOAT", "TRUE", "FALSE", "RPAR", "RSQB"})
_ATOMS = frozenset({"NAME", "INT", "FLOAT", "TRUE", "FALSE"})


class _LineBreaks:
    """Post-lexer: a line break ends a statement only outside parentheses.

    A body is statements followed by one final expression that may span
    lines; so a line break becomes the terminator ``_NL`` only while a
    ``let``/``layout``/``heads``/``score`` statement is open at parenthesis depth 0.
    A ``}`` closes an open statement too. All other line breaks vanish.
    The name ``score`` becomes the keyword ``SCORE`` where a statement may start.
    """

    always_accept = ("NEWLINE",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        open_statement = False
        nesting = _Nesting()
        previous = "LBRACE"
        for tok in stream:
            kind = tok.type
            if kind == "NAME" and tok.value == "score" and depth == 0 and previous in _BEFORE_SCORE:
                tok = Token.new_borrow_pos("SCORE", tok.value, tok)
                kind = "SCORE"
            previous = kind
            nesting.step(tok)
            if kind == "NEWLINE":
                if open_statement and depth == 0:
                    open_statement = False
                    yield Token.new_borrow_pos("_NL", tok.value, tok)
                continue
            if kind in ("LPAR", "LSQB"):
                depth += 1
            elif kind in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif kind == "SEMI" and depth == 0:
                open_statement = False
            elif kind == "RBRACE":
                if open_statement:
                    yield Token.new_borrow_pos("_NL", "", tok)
                open_statement = False
                depth = 0
            elif kind in _STATEMENT_KEYWORDS and depth == 0:
                open_statement = True
            yield tok


class _Nesting:
    """Counts how deeply the expression at each token nests; refuses more than :data:`MAX_NESTING`.

    A level is an open parenthesis or a prefix operator still waiting for its operand: in
    ``~(~(x`` the name ``x`` sits 4 levels deep. Refusing here, token by token, is what lets the
    error point at the place that nests too deeply instead of at the start of the file.
    """

    def __init__(self):
        self.runs: list[int] = []  # per open parenthesis: the prefix operators before it
        self.run = 0  # prefix operators since the last parenthesis or operand
        self.level = 0
        self.previous: str | None = None

    def step(self, tok: Token) -> None:
        kind = tok.type
        if kind == "NEWLINE":
            return
        if kind in ("LPAR", "LSQB"):
            self.runs.append(self.run)
            self.run = 0
            self.level += 1
        elif kind in ("RPAR", "RSQB") and self.runs:
            self.level -= 1 + self.run + self.runs.pop()
            self.run = 0
        elif kind in _PREFIX and (kind != "MINUS" or self.previous not in _OPERAND_END):
            self.run += 1
            self.level += 1
        elif kind in _ATOMS:
            self.level -= self.run
            self.run = 0
        elif kind == "RBRACE":
            self.runs, self.run, self.level = [], 0, 0
        self.previous = kind
        if self.level > MAX_NESTING:
            raise PatternSyntaxError(
                f"the expression nests more than {MAX_NESTING} levels deep here (parentheses and ~ - not); "
                "name inner parts with let",
                _token_span(tok, None),
            )


_PARSER = Lark(
    (Path(__file__).with_name("pattern.lark")).read_text(encoding="utf-8"),
    parser="lalr",
    lexer="basic",
    postlex=_LineBreaks(),
    propagate_positions=True,
    maybe_placeholders=False,
)


def _token_span(tok: Token, file: str | None) -> Span:
    line = tok.line or 1
    column = tok.column or 1
    end_line = tok.end_line or line
    end_column = tok.end_column or column + max(1, len(tok.value))
    if end_line == line and end_column <= column:
        end_column = column + 1
    return Span(file, line, column, end_line, end_column)


@v_args(meta=True, inline=True)
class _Builder(Transformer):
    """Builds :mod:`syntax` nodes from the lark parse tree."""

    def __init__(self, filename: str | None):
        super().__init__()
        self.file = filename
        #: ``id(node) -> (node, span with the parentheses)`` of parenthesized expressions.
        self._grouped: dict[int, tuple[syntax.Expr, Span]] = {}

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.file, 1, 1, 1, 2)
        return Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok(self, tok: Token) -> Span:
        return _token_span(tok, self.file)

    # -- definitions

    def start(self, meta, *defs):
        return syntax.Module(tuple(defs), self.file)

    def pattern_def(self, meta, _kw, name, *rest):
        params: tuple[syntax.Param, ...] = ()
        statements, final = (), None
        for item in rest:
            if isinstance(item, list):
                params = tuple(item)
            elif isinstance(item, tuple):
                statements, final = item
        return syntax.PatternDef(str(name), params, statements, final, self._span(meta), self._tok(name))

    def param_list(self, meta, *items):
        return [p for p in items if isinstance(p, syntax.Param)]

    def param(self, meta, name, *rest):
        default = rest[-1] if rest else None
        return syntax.Param(str(name), default, self._span(meta))

    def body(self, meta, *items):
        statements = []
        final = None
        for item in items:
            if isinstance(item, (syntax.Layout, syntax.Let, syntax.Heads, syntax.Input, syntax.Score)):
                statements.append(item)
            elif isinstance(item, syntax.Expr):
                final = item
        return (tuple(statements), final)

    def terminator(self, meta, *items):
        return Token("SEMI", ";")

    def layout_stmt(self, meta, _kw, kind, *items):
        axes = tuple(a for a in items if isinstance(a, syntax.Axis))
        return syntax.Layout(str(kind), axes, self._span(meta), self._tok(kind))

    def axis(self, meta, name, _eq, extent):
        return syntax.Axis(str(name), extent, self._span(meta))

    def let_stmt(self, meta, _kw, name, _eq, value):
        return syntax.Let(str(name), value, self._span(meta), self._tok(name))

    def heads_stmt(self, meta, _kw, lo, _dots, hi, _colon, body):
        return syntax.Heads(lo, hi, body, self._span(meta))

    def input_stmt(self, meta, _kw, name, _colon, kind, *items):
        dims = tuple(d for d in items if isinstance(d, syntax.Expr))
        return syntax.Input(str(name), str(kind), dims, self._span(meta), self._tok(name), self._tok(kind))

    def score_stmt(self, meta, _kw, value):
        return syntax.Score(value, self._span(meta))

    # -- expressions

    def or_expr(self, meta, *items):
        return syntax.BoolOp("or", tuple(items[::2]), self._span(meta))

    def and_expr(self, meta, *items):
        return syntax.BoolOp("and", tuple(items[::2]), self._span(meta))

    def not_op(self, meta, _kw, operand):
        return syntax.Unary("not", operand, self._span(meta))

    def cmp_expr(self, meta, *items):
        ops = items[1::2]
        return syntax.Compare(
            tuple(str(op) for op in ops), tuple(items[::2]), self._span(meta), tuple(self._tok(op) for op in ops)
        )

    def binop(self, meta, *items):
        # ``a OP b OP c ...`` of one precedence level, folded to the left without recursion:
        # ``(a OP b) OP c``. Each step spans from the chain's start to its right operand's end
        # (a parenthesized operand's end is its closing parenthesis, as the text shows it).
        start = self._span(meta)
        out = items[0]
        for op, right in zip(items[1::2], items[2::2], strict=True):
            grouped = self._grouped.get(id(right))
            end = grouped[1] if grouped is not None and grouped[0] is right else right.span
            span = Span(self.file, start.line, start.column, end.end_line, end.end_column)
            out = syntax.Binary(str(op), out, right, span, self._tok(op))
        return out

    def unop(self, meta, op, operand):
        return syntax.Unary(str(op), operand, self._span(meta))

    def power(self, meta, base, *rest):
        # ``?power`` with an alias is not inlined when the optional ``** unary`` is absent.
        if not rest:
            return base
        op, exponent = rest
        return syntax.Binary("**", base, exponent, self._span(meta), self._tok(op))

    def number(self, meta, tok):
        if tok.type == "FLOAT":
            value = float(tok)
            if value != value or value in (float("inf"), float("-inf")):
                raise PatternSyntaxError(f"number too large ({tok})", self._tok(tok))
            return syntax.Number(value, self._span(meta))
        # Python refuses to convert very long digit strings (leading zeros count too): convert the
        # significant digits only, and refuse more of them than any in-range integer has.
        digits = tok.lstrip("0") or "0"
        if len(digits) > 30:
            raise PatternSyntaxError(f"number too large ({len(digits)} digits)", self._tok(tok))
        return syntax.Number(int(digits), self._span(meta))

    def boolean(self, meta, tok):
        return syntax.Boolean(tok.type == "TRUE", self._span(meta))

    def name(self, meta, tok):
        return syntax.Name(str(tok), self._span(meta))

    def attribute(self, meta, base, _dot, attr):
        return syntax.Attribute(str(base), str(attr), self._span(meta), self._tok(attr))

    def index(self, meta, base, *items):
        indices = tuple(i for i in items if isinstance(i, syntax.Expr))
        return syntax.Index(str(base), indices, self._span(meta), self._tok(base))

    def call(self, meta, func, *items):
        args, keywords = [], []
        for item in items:
            if isinstance(item, syntax.Keyword):
                keywords.append(item)
            elif isinstance(item, syntax.Expr):
                if keywords:
                    raise PatternSyntaxError("a positional argument cannot follow a keyword argument", item.span)
                args.append(item)
        return syntax.Call(str(func), tuple(args), tuple(keywords), self._span(meta), self._tok(func))

    def argument(self, meta, value):
        return value

    def keyword(self, meta, name, _eq, value):
        return syntax.Keyword(str(name), value, self._span(meta))

    def group(self, meta, _lpar, inner, _rpar):
        self._grouped[id(inner)] = (inner, self._span(meta))
        return inner

    def tuple(self, meta, *items):
        return syntax.Tuple(tuple(i for i in items if isinstance(i, syntax.Expr)), self._span(meta))


# --------------------------------------------------------------------------- error messages

_WORDS = {
    "NAME": "a name",
    "INT": "a number",
    "FLOAT": "a number",
    "SCORE": "'score'",
    "SLASH": "'/'",
    "STARSTAR": "'**'",
    "_NL": "the end of the line",
    "$END": "the end of the input",
    "PATTERN": "'pattern'",
    "LAYOUT": "'layout'",
    "LET": "'let'",
    "HEADS": "'heads'",
    "INPUT": "'input'",
    "LSQB": "'['",
    "RSQB": "']'",
    "TRUE": "'true'",
    "FALSE": "'false'",
    "OR": "'or'",
    "AND": "'and'",
    "NOT": "'not'",
    "CMP_OP": "a comparison",
    "BAR": "'|'",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "AMP": "'&'",
    "STAR": "'*'",
    "FLOORDIV": "'//'",
    "PERCENT": "'%'",
    "TILDE": "'~'",
    "DOTDOT": "'..'",
    "DOT": "'.'",
    "COLON": "':'",
    "SEMI": "';'",
    "COMMA": "','",
    "EQUAL": "'='",
    "LPAR": "'('",
    "RPAR": "')'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
}
# Terminals that can start an expression, and the binary operators.
_EXPR_START = frozenset({"INT", "FLOAT", "NAME", "TRUE", "FALSE", "LPAR", "MINUS", "TILDE", "NOT"})
# Tokens that end an expression: an operator just before one of them is left without an operand.
_CLOSERS = frozenset({"RBRACE", "RPAR", "RSQB", "$END", "_NL", "COMMA", "SEMI", "DOTDOT", "COLON"})
_OPERATORS = frozenset(
    {"OR", "AND", "CMP_OP", "BAR", "PLUS", "MINUS", "AMP", "STAR", "STARSTAR", "SLASH", "FLOORDIV", "PERCENT"}
)


def _describe_expected(expected: set[str]) -> str:
    expected = {e for e in expected if e in _WORDS}
    parts: list[str] = []
    if len(expected & _EXPR_START) >= 4:
        parts.append("an expression")
        expected -= _EXPR_START
    if len(expected & _OPERATORS) >= 4:
        parts.append("an operator")
        expected -= _OPERATORS
    parts.extend(sorted(_WORDS[e] for e in expected))
    if not parts:
        return ""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of input"
    if tok.type == "_NL":
        return "end of line" if tok.value else "end of statement"
    if tok.type == "NAME":
        return f"name '{tok.value}'"
    if tok.type in ("INT", "FLOAT"):
        return f"number {tok.value}"
    return f"'{tok.value}'"


def _hint(tok: Token, expected: set[str], source: str) -> str:
    start = tok.start_pos if isinstance(tok.start_pos, int) else 0
    if tok.type in ("BAR", "AMP") and start > 0 and source[start - 1] == tok.value:
        word = "or" if tok.type == "BAR" else "and"
        return f"; there is no '{tok.value * 2}': patterns combine with '{tok.value}', conditions with '{word}'"
    if tok.type == "_NL" and tok.value:
        return "; a statement ends at the end of its line (wrap it in parentheses to continue it)"
    if tok.type in _STATEMENT_KEYWORDS and "RBRACE" in expected:
        return "; statements come before the final expression"
    if tok.type in _EXPR_START and "RBRACE" in expected:
        return "; a body has one final expression (combine patterns with | or &)"
    return ""


def _acceptable(err: UnexpectedToken) -> set[str]:
    """Terminals the parser really accepts here (LALR's raw table also lists merged look-aheads)."""
    parser = getattr(err, "interactive_parser", None)
    if parser is not None:
        try:
            return set(parser.accepts())
        except Exception:  # a failed look-ahead simulation only loses precision in the message
            pass
    return set(err.expected)


def _dangling_operator(tok: Token, expected: set[str], source: str) -> Token | None:
    """The operator just before ``tok`` when it is left without an operand (``tok`` cannot start one)."""
    if tok.type not in _CLOSERS or len(expected & _EXPR_START) < 4:
        return None
    start = tok.start_pos if isinstance(tok.start_pos, int) else len(source)
    previous = None
    try:
        for previous in _PARSER.lex(source[:start]):  # noqa: B007 -- the last token is wanted
            pass
    except (UnexpectedInput, PatternError):
        return None
    if previous is None or previous.type not in _OPERATORS | {"TILDE", "NOT"}:
        return None
    return previous


def _syntax_error(err: UnexpectedInput, source: str, filename: str | None) -> PatternSyntaxError:
    if isinstance(err, UnexpectedCharacters):
        line, column = err.line, err.column
        char = source[err.pos_in_stream] if 0 <= err.pos_in_stream < len(source) else "?"
        span = Span(filename, line, column, line, column + 1)
        if char == '"' or char == "'":
            message = f"unexpected {char!r}: the language has no strings"
        else:
            message = f"unexpected character {char!r}"
        return PatternSyntaxError(message, span, source)
    if isinstance(err, UnexpectedToken):
        tok = err.token
        span = _token_span(tok, filename)
        if tok.type == "$END":
            lines = source.splitlines() or [""]
            span = Span(filename, len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        expected = _acceptable(err)
        wanted = _describe_expected(expected)
        dangling = _dangling_operator(tok, expected, source)
        if dangling is not None:
            # ``causal &`` at the end of a line: the mistake is the operator, not the next line's ``}``.
            message = f"'{dangling.value}' has no right operand: expected {wanted}, found {_describe_token(tok)}"
            return PatternSyntaxError(message + _hint(tok, expected, source), _token_span(dangling, filename), source)
        message = f"unexpected {_describe_token(tok)}"
        if wanted:
            message += f"; expected {wanted}"
        return PatternSyntaxError(message + _hint(tok, expected, source), span, source)
    return PatternSyntaxError(str(err).splitlines()[0], Span(filename, err.line or 1, err.column or 1, 1, 2), source)


def parse(source: str, filename: str | None = None) -> syntax.Module:
    """Parse pattern-language source text.

    Args:
        source: the text of one source file (one or more ``pattern`` definitions).
        filename: the file name to put in spans and messages (None for a string).

    Returns:
        The :class:`syntax.Module` with one :class:`syntax.PatternDef` per definition.

    Raises:
        PatternSyntaxError: when the text does not follow the grammar.
    """
    if not isinstance(source, str):
        raise PatternError(f"pattern source must be a str, got {type(source).__name__}")
    # Parse trees hold no reference cycles, and the cyclic collector's full passes over the many
    # young nodes of a long source cost more than the parse itself (superlinear in its length).
    paused = gc.isenabled()
    gc.disable()
    try:
        return _parse(source, filename)
    finally:
        if paused:
            gc.enable()


def _parse(source: str, filename: str | None) -> syntax.Module:
    try:
        tree = _PARSER.parse(source)
    except PatternError as err:  # from the post-lexer
        raise err.with_source(source, filename) from None
    except UnexpectedInput as err:
        raise _syntax_error(err, source, filename) from None
    except RecursionError:
        raise PatternSyntaxError("the source is nested too deeply", Span(filename, 1, 1, 1, 2), source) from None
    try:
        module = _Builder(filename).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, PatternError):
            raise err.orig_exc.with_source(source, filename) from None
        if isinstance(err.orig_exc, RecursionError):
            raise PatternSyntaxError("the source is nested too deeply", Span(filename, 1, 1, 1, 2), source) from None
        raise
    except RecursionError:
        raise PatternSyntaxError("the source is nested too deeply", Span(filename, 1, 1, 1, 2), source) from None
    return syntax.Module(module.patterns, filename, source)
