"""Symbolic dimension expressions read from text by a grammar of our own, never by `eval`.

The text form of a dim is what `sympy.sstr` prints for the dims the importer and the ops
produce, and nothing more:

```
expr    := term (('+' | '-') term)*
term    := unary (('*' | '/' | '//') unary)*
unary   := '-' unary | power
power   := primary ('**' exponent)?           exponent: N or (-N), N <= 16
primary := INT | NAME | NAME '(' expr (',' expr)* ')' | '(' expr ')'
```

Names are symbols (positive integers, see `symbol`) unless a call: `floor`, `ceiling`, `Max`,
`Min`, `Mod`. `a//b` is `FloorDiv`, printed back as `(a//b)` the way torch's FloorDiv prints,
so that imported dims such as `((S + 1)//2)` round-trip exactly (and the runtime's dim
evaluator reads them). Every expression is built with sympy's constructors, step by step,
and each step is bounded: literals of at most 19 digits, every number it holds (literal or
folded) at most 2**62, exponents at most 64, nesting at most 32, text at most 512 characters.
The dims are simplified afterwards (`types.make_dim`), and sympy's simplify grows
exponentially with the terms of an expanded product and with nested calls, so a dim also
expands to at most 64 terms (`expanded_terms`), holds at most 8 calls, nested at most 4 deep,
and Max/Min take at most 4 arguments. A violation is a `ParseError` with line and column.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from ..errors import ParseError

MAX_DIM = 2**62
"""The largest dimension, and the largest number a dim expression may hold."""
MAX_DIGITS = 19
MAX_EXPONENT = 16  # what the text may write; folded powers may reach MAX_FOLDED_EXPONENT
MAX_FOLDED_EXPONENT = 64
MAX_DEPTH = 32
MAX_LENGTH = 512
MAX_NAME = 64
MAX_TERMS = 64
"""The most terms a dim (and the product of a tensor type's dims) may expand to."""
MAX_CALLS = 8
MAX_CALL_DEPTH = 4
MAX_CALL_ARGS = 4

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"[0-9]+")
_SPACE = " \t"


def symbol(name: str) -> sympy.Symbol:
    """A symbolic dimension (positive integer symbol) such as the batch `B`."""
    return sympy.Symbol(name, integer=True, positive=True)


class FloorDiv(sympy.Function):
    """`a // b` of integer dims (Python's floor division), printed `(a//b)` as torch's is."""

    nargs = (2,)
    precedence = 35  # below Add's, as torch's FloorDiv: `((S//2)) + 1` keeps its parentheses
    is_integer = True

    # sympy's stub declares `eval(cls, *args) -> None`; subclasses name their arguments
    @classmethod
    def eval(  # pyright: ignore[reportIncompatibleMethodOverride]
            cls, base: sympy.Expr, divisor: sympy.Expr) -> sympy.Expr | None:
        """Fold constants and the trivial cases; leave the rest as written."""
        if isinstance(base, sympy.Integer) and isinstance(divisor, sympy.Integer) and divisor:
            return sympy.Integer(int(base) // int(divisor))
        if base.is_zero:
            return sympy.S.Zero
        if divisor == 1 and base.is_integer:
            return base
        return None

    def _sympystr(self, printer: StrPrinter) -> str:
        base = printer.parenthesize(self.args[0], PRECEDENCE["Atom"] - 0.5)
        divisor = printer.parenthesize(self.args[1], PRECEDENCE["Atom"] - 0.5)
        return f"({base}//{divisor})"

    def _pythoncode(self, printer: StrPrinter) -> str:
        # lambdify (the TVM lowering) builds floordiv from `//` on its index expressions
        return f"(({printer.doprint(self.args[0])})//({printer.doprint(self.args[1])}))"

    _lambdacode = _pythoncode


def floor_div(base: sympy.Expr | int, divisor: sympy.Expr | int) -> sympy.Expr:
    """`base // divisor` as a dim (sympy's stubs type a Function call as its class)."""
    return cast(sympy.Expr, FloorDiv(base, divisor))


_CALLS: dict[str, tuple[int, int, Callable[..., Any]]] = {
    # name: (fewest args, most args, constructor)
    "floor": (1, 1, sympy.floor),
    "ceiling": (1, 1, sympy.ceiling),
    "Mod": (2, 2, sympy.Mod),
    "Max": (2, MAX_CALL_ARGS, sympy.Max),
    "Min": (2, MAX_CALL_ARGS, sympy.Min),
}


def error_at(text: str, pos: int, message: str) -> ParseError:
    """A ParseError at offset `pos` of `text`, with its line, column and source line."""
    pos = max(0, min(pos, len(text)))
    line = text.count("\n", 0, pos) + 1
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return ParseError(line, pos - start + 1, message, text[start:end if end >= 0 else len(text)])


def parse_dim(text: str) -> sympy.Expr:
    """The dim expression that is all of `text` (`B`, `16`, `2*S + 1`, `(S//2)`)."""
    reader = DimReader(text, 0)
    expr = reader.expression()
    reader.skip()
    if reader.pos != len(text):
        raise reader.error(f"expected an operator or the end of the dimension, got "
                           f"{text[reader.pos:reader.pos + 10]!r}")
    return reader.finish(expr, 0)


def read_parenthesized_dim(text: str, pos: int) -> tuple[sympy.Expr, int]:
    """The dim `(expr)` that starts at `text[pos]`, and the offset just past its `)`."""
    reader = DimReader(text, pos)
    expr = reader.primary()
    return reader.finish(expr, pos), reader.pos


class DimReader:
    """Recursive descent over one dim expression inside a larger text (offsets are global)."""

    def __init__(self, text: str, pos: int) -> None:
        self.text, self.pos, self.start, self.depth = text, pos, pos, 0

    def error(self, message: str, pos: int | None = None) -> ParseError:
        """A ParseError at `pos` (default: the current position)."""
        return error_at(self.text, self.pos if pos is None else pos, message)

    def skip(self) -> None:
        """Skip spaces (sympy prints `S + 1`); bound the length read so far."""
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1
        if self.pos - self.start > MAX_LENGTH:
            raise self.error(f"dimension expression longer than {MAX_LENGTH} characters",
                             self.start)

    def accept(self, token: str) -> bool:
        """Consume `token` if it comes next (`*` is not taken from `**`, nor `/` from `//`)."""
        self.skip()
        if not self.text.startswith(token, self.pos):
            return False
        doubled = token in ("*", "/") and self.text.startswith(token * 2, self.pos)
        if doubled:
            return False
        self.pos += len(token)
        return True

    def found(self) -> str:
        """What comes next, for messages."""
        self.skip()
        return repr(self.text[self.pos:self.pos + 10]) if self.pos < len(self.text) else \
            "end of input"

    def nested(self) -> None:
        """Count one more level of nesting, refusing more than MAX_DEPTH."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"dimension expression nested deeper than {MAX_DEPTH} levels")

    # ---- grammar ----------------------------------------------------------------------------
    def expression(self) -> sympy.Expr:
        """`term (('+' | '-') term)*`."""
        expr = self.term()
        while True:
            pos = self.pos
            if self.accept("+"):
                rhs = self.term()
                expr = self.build(sympy.Add, (expr, rhs), pos)
            elif self.accept("-"):
                rhs = self.term()
                expr = self.build(sympy.Add, (expr, -rhs), pos)
            else:
                return expr

    def term(self) -> sympy.Expr:
        """`unary (('*' | '/' | '//') unary)*`."""
        expr = self.unary()
        while True:
            self.skip()
            pos = self.pos
            if self.accept("*"):
                expr = self.build(sympy.Mul, (expr, self.unary()), pos)
            elif self.accept("//"):
                divisor = self.nonzero(self.unary(), pos)
                expr = self.build(floor_div, (expr, divisor), pos)
            elif self.accept("/"):
                divisor = self.nonzero(self.unary(), pos)
                expr = self.build(sympy.Mul, (expr, sympy.Pow(divisor, -1)), pos)
            else:
                return expr

    def unary(self) -> sympy.Expr:
        """`'-' unary | power`."""
        pos = self.pos
        if self.accept("-"):
            self.nested()
            operand = self.unary()
            self.depth -= 1
            return self.build(sympy.Mul, (sympy.S.NegativeOne, operand), pos)
        return self.power()

    def power(self) -> sympy.Expr:
        """`primary ('**' exponent)?`: a literal exponent, `N` or `(-N)`."""
        base = self.primary()
        self.skip()
        pos = self.pos
        if not self.accept("**"):
            return base
        self.skip()
        negative = self.accept("(")
        if negative and not self.accept("-"):
            raise self.error(f"expected '-' in a negative exponent '(-N)', got {self.found()}")
        exponent = self.integer(MAX_EXPONENT, "an exponent")
        if negative and not self.accept(")"):
            raise self.error(f"expected ')' closing the exponent, got {self.found()}")
        if self.accept("**"):
            raise self.error("chained '**' in a dimension: write one power with a literal "
                             "exponent, such as S**2", self.pos - 2)
        return self.build(sympy.Pow, (base, -exponent if negative else exponent), pos)

    def primary(self) -> sympy.Expr:
        """An integer, a symbol, a call, or a parenthesized expression."""
        self.skip()
        pos = self.pos
        if self.accept("("):
            self.nested()
            expr = self.expression()
            if not self.accept(")"):
                raise self.error(f"expected ')' closing the '(' at column "
                                 f"{self.column(pos)}, got {self.found()}")
            self.depth -= 1
            return expr
        if _INT.match(self.text, self.pos):
            return sympy.Integer(self.integer(MAX_DIM, "a number"))
        name_match = _NAME.match(self.text, self.pos)
        if not name_match:
            raise self.error(f"expected a number, a symbol or '(' in a dimension, got "
                             f"{self.found()}")
        name = name_match.group(0)
        if len(name) > MAX_NAME:
            raise self.error(f"symbol name longer than {MAX_NAME} characters")
        self.pos = name_match.end()
        if not self.text.startswith("(", self.pos):
            return symbol(name)
        return self.call(name, pos)

    def call(self, name: str, pos: int) -> sympy.Expr:
        """`name(args)` for the few functions dims use."""
        if name not in _CALLS:
            raise self.error(f"unknown function '{name}' in a dimension; dims may call "
                             f"{', '.join(_CALLS)}", pos)
        fewest, most, make = _CALLS[name]
        self.pos += 1  # the '('
        self.nested()
        args = [self.expression()]
        while self.accept(","):
            args.append(self.expression())
        if not self.accept(")"):
            raise self.error(f"expected ',' or ')' in the call of {name}, got {self.found()}")
        self.depth -= 1
        if not fewest <= len(args) <= most:
            want = str(fewest) if most == fewest else f"{fewest} to {most}"
            raise self.error(f"{name} takes {want} argument(s), got {len(args)}", pos)
        return self.build(make, tuple(args), pos)

    def integer(self, limit: int, what: str) -> int:
        """A decimal literal of at most MAX_DIGITS digits and at most `limit`."""
        self.skip()
        match = _INT.match(self.text, self.pos)
        if not match:
            raise self.error(f"expected {what}, got {self.found()}")
        digits = match.group(0)
        if len(digits) > MAX_DIGITS or int(digits) > limit:
            raise self.error(f"{what} {digits[:24]}{'...' if len(digits) > 24 else ''} is "
                             f"out of range: at most {limit}")
        self.pos = match.end()
        return int(digits)

    # ---- building -----------------------------------------------------------------------
    def nonzero(self, divisor: sympy.Expr, pos: int) -> sympy.Expr:
        """`divisor`, unless it is zero."""
        if divisor.is_zero:
            raise self.error("division by zero in a dimension (the divisor is 0)", pos)
        return divisor

    def build(self, make: Callable[..., Any], args: tuple, pos: int) -> sympy.Expr:
        """`make(*args)`, refused when it is not finite or holds an unbounded number."""
        try:
            expr = make(*args)
        except (ArithmeticError, TypeError, ValueError, RecursionError) as exc:
            raise self.error(f"cannot build this dimension: {type(exc).__name__}: {exc}",
                             pos) from None
        bounded(expr, lambda message: self.error(message, pos))
        return expr

    def finish(self, expr: sympy.Expr, pos: int) -> sympy.Expr:
        """The whole expression, which must be an integer."""
        if expr.is_integer is not True:
            raise self.error(f"a dimension must be an integer expression, got "
                             f"{sympy.sstr(expr)}", pos)
        return expr

    def column(self, pos: int) -> int:
        """The 1-based column of `pos`."""
        return pos - self.text.rfind("\n", 0, pos)


def expanded_terms(dim: int | sympy.Basic) -> int:
    """How many terms `dim` has once products and powers of sums are multiplied out (calls
    count as one term), capped at MAX_TERMS + 1."""
    cap = MAX_TERMS + 1
    if isinstance(dim, int) or not (dim.is_Add or dim.is_Mul or dim.is_Pow):
        return 1
    if dim.is_Add:
        return min(cap, sum(expanded_terms(a) for a in dim.args))
    if dim.is_Mul:
        total = 1
        for arg in dim.args:
            total = min(cap, total * expanded_terms(arg))
        return total
    base, exponent = dim.args
    if not isinstance(exponent, sympy.Integer) or abs(exponent.p) > MAX_FOLDED_EXPONENT:
        return cap
    return min(cap, expanded_terms(base) ** abs(exponent.p))


def _calls(expr: sympy.Basic) -> tuple[int, int]:
    """(how many calls `expr` holds, how deep they nest)."""
    count, depth = 0, 0
    for arg in expr.args:
        inner_count, inner_depth = _calls(arg)
        count, depth = count + inner_count, max(depth, inner_depth)
    if expr.is_Function:
        return count + 1, depth + 1
    return count, depth


def bounded(expr: sympy.Expr, fail: Callable[[str], ParseError]) -> None:
    """Raise `fail(message)` unless every number in `expr` is finite and at most MAX_DIM,
    every power at most MAX_FOLDED_EXPONENT, and the expression small enough to simplify:
    at most MAX_TERMS expanded terms, MAX_CALLS calls nested at most MAX_CALL_DEPTH deep."""
    for node in sympy.preorder_traversal(expr):
        if node in (sympy.zoo, sympy.oo, -sympy.oo, sympy.nan) or node.is_Float:
            raise fail(f"a dimension must be finite and exact, got {sympy.sstr(expr)[:60]}")
        if isinstance(node, sympy.Rational) and max(abs(node.p), node.q) > MAX_DIM:
            raise fail(f"a number in this dimension is larger than 2**62: "
                       f"{str(node)[:24]}...")
        if isinstance(node, sympy.Pow) and not (
                node.exp.is_Integer and abs(int(node.exp)) <= MAX_FOLDED_EXPONENT):
            raise fail(f"a power in this dimension is beyond **{MAX_FOLDED_EXPONENT}: "
                       f"{sympy.sstr(node)[:60]}")
    if expanded_terms(expr) > MAX_TERMS:
        raise fail(f"dimension too complex: it expands to more than {MAX_TERMS} terms")
    count, depth = _calls(expr)
    if count > MAX_CALLS or depth > MAX_CALL_DEPTH:
        raise fail(f"dimension too complex: {count} call(s) nested {depth} deep, expected "
                   f"at most {MAX_CALLS} nested at most {MAX_CALL_DEPTH} deep")
