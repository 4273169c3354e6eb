"""Parser for the generic text form; errors carry line:column and what was expected.

IR text is data: nothing in it is evaluated (dims are read by `ir.dimexpr`'s grammar), and
the grammar bounds what it builds, so that any text ends in a Module or a `ParseError`:
nesting of regions and attribute lists (MAX_NESTING), tensor rank (MAX_RANK), dims (at most
2**62), integer literals (64 bits), result counts. Verification afterwards raises
`VerifyError`.
"""
from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping

import numpy as np

from ..errors import IRError, ParseError, TextVerifyError, VerifyError
from .attributes import Attribute, DenseAttr
from .core import OP_REGISTRY, Block, Operation, Region, Value
from .dimexpr import (
    MAX_DIGITS,
    MAX_DIM,
    MAX_TERMS,
    error_at,
    expanded_terms,
    read_parenthesized_dim,
    symbol,
)
from .dtypes import DType, parse_dtype
from .module import Module
from .types import Dim, GroupAxis, QuantType, TensorType, ZeroPoint
from .verifier import verify

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.$-]*")
_VALUE = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*|[0-9]+(#[0-9]+)?)")
_NUMBER = re.compile(r"-?(inf|nan|[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?)")
_WORD = re.compile(r"[A-Za-z0-9_]+")
_UPPER = re.compile(r"[A-Z][A-Z0-9_]*")
_DTYPE = re.compile(r"[a-z][a-z0-9]*")
_DIGITS = re.compile(r"[0-9]+")
_KEYWORD = re.compile(r"(none|true|false)\b")
_KEYWORDS: dict[str, Attribute] = {"none": None, "true": True, "false": False}

MAX_NESTING = 64
"""Deepest nesting of regions and of attribute lists."""
MAX_RANK = 64
MAX_RESULTS = 1 << 16
INT_RANGE = (-(2**63), 2**64 - 1)
"""Integer attributes hold i64 or u64 values."""


class Parser:
    """Scannerless recursive descent over the text; one instance parses one module."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.scopes: list[dict[str, Value]] = [{}]
        self.depth = 0
        self.op_positions: dict[Operation, int] = {}  # where each op starts, for verify

    # ---- low level ----------------------------------------------------------------------
    def error(self, message: str, pos: int | None = None) -> ParseError:
        """A ParseError at `pos` (default: the current position)."""
        return error_at(self.text, self.pos if pos is None else pos, message)

    def nest(self, what: str) -> None:
        """Enter one more level of regions or attribute lists, refusing too many."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"{what} nested deeper than {MAX_NESTING} levels")

    def skip(self) -> None:
        """Skip whitespace and `//` comments."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1
            if self.text.startswith("//", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def peek(self, token: str) -> bool:
        """True if the text continues with `token` (after whitespace)."""
        self.skip()
        return self.text.startswith(token, self.pos)

    def accept(self, token: str) -> bool:
        """Consume `token` if it comes next."""
        if self.peek(token):
            self.pos += len(token)
            return True
        return False

    def expect(self, token: str, what: str | None = None) -> None:
        """Consume `token` or fail saying what was expected."""
        if not self.accept(token):
            raise self.error(f"expected {what or repr(token)}, got {self.found()}")

    def found(self) -> str:
        """A short description of what comes next, for error messages."""
        self.skip()
        if self.pos >= len(self.text):
            return "end of input"
        match = re.compile(r"\S+").match(self.text, self.pos)
        token = match.group(0)[:20] if match else self.text[self.pos]
        return repr(token)

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        """Consume a regex match or fail."""
        self.skip()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}, got {self.found()}")
        self.pos = m.end()
        return m.group(0)

    def string(self) -> str:
        """A JSON string literal."""
        self.skip()
        if not self.peek('"'):
            raise self.error(f"expected a string literal, got {self.found()}")
        decoder = json.JSONDecoder()
        try:
            value, end = decoder.raw_decode(self.text, self.pos)
        except json.JSONDecodeError as exc:
            raise self.error(f"bad string literal: {exc.msg}") from None
        self.pos = end
        return value

    # ---- types --------------------------------------------------------------------------
    def tensor_type(self) -> TensorType:
        """`tensor<d0xd1x...xelement>`."""
        self.expect("tensor<", "a tensor type 'tensor<...>'")
        type_pos = self.pos
        dims: list[Dim] = []
        while True:
            start = self.pos
            if len(dims) > MAX_RANK:
                raise self.error(f"tensor rank above {MAX_RANK}", type_pos)
            if self.text[self.pos:self.pos + 1].isdigit():
                dims.append(self.integer(0, MAX_DIM, "a dimension"))
            elif self.text.startswith("(", self.pos):
                expr, self.pos = read_parenthesized_dim(self.text, self.pos)
                dims.append(expr)
            elif _UPPER.match(self.text, self.pos):
                dims.append(symbol(self.match(_UPPER, "a symbol")))
            else:
                element = self.element_type()
                self.expect(">", "'>' closing the tensor type")
                self.check_dims_product(dims, type_pos)
                try:
                    return TensorType(tuple(dims), element)
                except IRError as exc:
                    raise self.error(f"bad tensor type: {exc}", type_pos) from None
            if not self.text.startswith("x", self.pos):
                raise self.error(f"expected 'x' after dimension, got {self.found()}", start)
            self.pos += 1

    def check_dims_product(self, dims: list[Dim], pos: int) -> None:
        """The element count of a shape is simplified by the verifier: it must expand to at
        most MAX_TERMS terms, as each dim must (see `ir.dimexpr`)."""
        terms = 1
        for d in dims:
            terms = min(MAX_TERMS + 1, terms * expanded_terms(d))
        if terms > MAX_TERMS:
            raise self.error(f"tensor type too complex: the product of its dims expands to "
                             f"more than {MAX_TERMS} terms", pos)

    def integer(self, low: int, high: int, what: str) -> int:
        """A decimal literal (an optional '-' when `low` < 0) within [low, high]."""
        self.skip()
        start = self.pos
        sign = -1 if low < 0 and self.accept("-") else 1
        digits = self.match(_DIGITS, what)
        if len(digits) > MAX_DIGITS + 1 or not low <= sign * int(digits) <= high:
            shown = digits if len(digits) <= 24 else digits[:24] + "..."
            raise self.error(f"{what} {'-' if sign < 0 else ''}{shown} is out of range: "
                             f"expected {low} .. {high}", start)
        return sign * int(digits)

    def element_type(self) -> DType | QuantType:
        """A dtype name or a `!quant.weight<...>` type."""
        if self.accept("!quant.weight<"):
            storage = self.dtype()
            fields = {}
            for key in ("group", "axis", "scale", "zero_point"):
                self.expect(",")
                self.expect(key, f"'{key}='")
                self.expect("=")
                fields[key] = self.match(_WORD, f"a value for {key}")
            self.expect(">", "'>' closing the quantized type")
            try:
                return QuantType(storage, int(fields["group"]), GroupAxis(fields["axis"]),
                                 parse_dtype(fields["scale"]), ZeroPoint(fields["zero_point"]))
            except ValueError as exc:
                raise self.error(f"bad quantized type: {exc}") from None
        return self.dtype()

    def dtype(self) -> DType:
        """A dtype name such as f32, i3, u5, f4e2m1."""
        start = self.pos
        text = self.match(_DTYPE, "an element type (f32, i3, f4e2m1, ...)")
        try:
            return parse_dtype(text)
        except ValueError as exc:
            raise self.error(str(exc), start) from None

    def type_list(self) -> list[TensorType]:
        """`(t0, t1, ...)`."""
        self.expect("(")
        types: list[TensorType] = []
        if not self.accept(")"):
            types.append(self.tensor_type())
            while self.accept(","):
                types.append(self.tensor_type())
            self.expect(")", "')' or ','")
        return types

    # ---- attributes ---------------------------------------------------------------------
    def attribute(self) -> Attribute:
        """One attribute value."""
        self.skip()
        if self.peek('"'):
            return self.string()
        if self.accept("["):
            self.nest("attribute lists")
            items: list[Attribute] = []
            if not self.accept("]"):
                items.append(self.attribute())
                while self.accept(","):
                    items.append(self.attribute())
                self.expect("]", "']' or ','")
            self.depth -= 1
            return tuple(items)
        if self.accept("dense<"):
            return self.dense()
        keyword = _KEYWORD.match(self.text, self.pos)  # not on a copy of the rest: linear
        if keyword:
            self.pos = keyword.end()
            return _KEYWORDS[keyword.group(0)]
        if _NUMBER.match(self.text, self.pos):
            return self.number()
        if _DTYPE.match(self.text, self.pos):
            return self.dtype()
        raise self.error(f"expected an attribute value, got {self.found()}")

    def number(self) -> int | float:
        """An int or float literal (floats have '.', an exponent, inf or nan)."""
        start = self.pos
        text = self.match(_NUMBER, "a number")
        if any(c in text for c in ".eEn") or "inf" in text:
            return float(text)
        self.pos = start
        return self.integer(*INT_RANGE, "an integer literal")

    def dense(self) -> DenseAttr:
        """`dense<tensor<...> [v, ...]>` (after `dense<`)."""
        start = self.pos
        type = self.tensor_type()
        self.expect("[")
        values: list[Attribute] = []
        if not self.accept("]"):
            values.append(self.attribute())
            while self.accept(","):
                values.append(self.attribute())
            self.expect("]", "']' or ','")
        self.expect(">", "'>' closing dense")
        if not isinstance(type.dtype, DType):
            raise self.error("a dense literal needs a plain element type", start)
        try:
            array = np.array(values, dtype=type.dtype.numpy_dtype).reshape(
                tuple(int(d) for d in type.shape))
            return DenseAttr(type, array)
        except (ValueError, TypeError, OverflowError, IRError) as exc:
            raise self.error(f"bad dense literal: {exc}", start) from None

    def attr_dict(self) -> dict[str, Attribute]:
        """`{key = value, ...}`."""
        attrs: dict[str, Attribute] = {}
        if self.accept("}"):
            return attrs
        while True:
            key_pos = self.pos
            key = self.match(_IDENT, "an attribute name")
            if key in attrs:
                raise self.error(f"duplicate attribute '{key}'", key_pos)
            self.expect("=")
            attrs[key] = self.attribute()
            if self.accept("}"):
                return attrs
            self.expect(",", "',' or '}'")

    # ---- values, ops, blocks ------------------------------------------------------------
    def lookup(self, name: str, pos: int) -> Value:
        """The value a `%name` refers to, searching enclosing scopes."""
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise self.error(f"use of undefined value %{name}", pos)

    def define(self, name: str, value: Value, pos: int) -> None:
        """Bind `%name` in the innermost scope."""
        if any(name in scope for scope in self.scopes):
            raise self.error(f"redefinition of value %{name}", pos)
        self.scopes[-1][name] = value

    def op(self) -> Operation:
        """One op in generic form."""
        self.skip()
        start = self.pos
        result_name, count = None, 0
        if self.peek("%"):
            count = 1
            result_name = self.match(re.compile(r"%[0-9]+"), "a result name like %3")[1:]
            if self.accept(":"):
                count = self.integer(0, MAX_RESULTS, "a result count")
            self.expect("=")
        name_pos = self.pos
        name = self.string()
        cls = OP_REGISTRY.get(name)
        if cls is None:
            dialect = name.split(".", 1)[0]
            known = sorted(n for n in OP_REGISTRY if n.startswith(dialect + "."))
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            if known:
                hint += f" ({len(known)} {dialect} ops are registered; see ir.list_dialects())"
            raise self.error(f"unknown op '{name}'{hint}", name_pos + 1)
        self.expect("(")
        operands: list[tuple[Value, int]] = []
        if not self.accept(")"):
            while True:
                pos = self.pos
                operands.append((self.lookup(self.match(_VALUE, "an operand like %3")[1:],
                                             pos), pos))
                if self.accept(")"):
                    break
                self.expect(",", "',' or ')'")
        regions = self.regions() if self.peek("(") else []
        attrs_pos = self.pos
        attrs = self.attr_dict() if self.accept("{") else {}
        try:
            attrs = cls._with_defaults(attrs)
        except (IRError, ValueError, TypeError, OverflowError) as exc:  # float("text") too
            raise self.error(str(exc), attrs_pos) from None
        self.expect(":", "':' and the op's type signature")
        sig_pos = self.pos
        in_types = self.type_list()
        self.expect("->")
        out_types = self.type_list() if self.peek("(") else [self.tensor_type()]
        self.check_signature(name, operands, in_types, out_types, count, sig_pos)
        loc = None
        if self.accept("loc("):
            loc = self.string()
            self.expect(")")
        op = cls([v for v, _ in operands], out_types, attrs, regions, loc)
        self.op_positions[op] = start
        if result_name is not None:
            if len(op.results) == 1:
                self.define(result_name, op.results[0], start)
            for i, result in enumerate(op.results if len(op.results) > 1 else []):
                self.define(f"{result_name}#{i}", result, start)
        elif op.results:
            raise self.error(f"op '{name}' has results but they are not named", start)
        return op

    def check_signature(self, name: str, operands: list[tuple[Value, int]],
                        in_types: list[TensorType], out_types: list[TensorType],
                        count: int, pos: int) -> None:
        """The printed signature must agree with the operands' types and result count."""
        if len(in_types) != len(operands):
            raise self.error(f"'{name}' signature lists {len(in_types)} operand type(s) "
                             f"for {len(operands)} operand(s)", pos)
        for (value, vpos), declared in zip(operands, in_types, strict=True):
            if not value.type.same_as(declared):
                raise self.error(f"operand type mismatch: value has type {value.type}, "
                                 f"signature says {declared}", vpos)
        if count != len(out_types):
            raise self.error(f"'{name}' defines {count} result(s) but its signature has "
                             f"{len(out_types)}", pos)

    def regions(self) -> list[Region]:
        """`({ ^bb0(...): ops }, ...)`."""
        self.expect("(")
        self.nest("regions")
        regions: list[Region] = []
        while True:
            self.expect("{", "'{' opening a region")
            self.scopes.append({})
            block = self.block_header()
            while not self.accept("}"):
                block.append(self.op())
            self.scopes.pop()
            regions.append(Region([block]))
            if self.accept(")"):
                self.depth -= 1
                return regions
            self.expect(",", "',' or ')'")

    def block_header(self) -> Block:
        """`^bb0(%a: type, ...):`."""
        self.expect("^bb0(", "a block header '^bb0('")
        names, types, positions = self.arg_list()
        self.expect(":")
        block = Block(types, names)
        for arg, name, pos in zip(block.args, names, positions, strict=True):
            self.define(name, arg, pos)
        return block

    def arg_list(self) -> tuple[list[str], list[TensorType], list[int]]:
        """`%name: type, ... )` (after the opening parenthesis)."""
        names, types, positions = [], [], []
        if not self.accept(")"):
            while True:
                self.skip()
                positions.append(self.pos)
                names.append(self.match(_VALUE, "an argument like %x")[1:])
                self.expect(":")
                types.append(self.tensor_type())
                if self.accept(")"):
                    break
                self.expect(",", "',' or ')'")
        return names, types, positions

    def module(self, weights: Mapping[str, np.ndarray] | None) -> Module:
        """`module @name { func.func @main(...) -> (...) { ops } }`."""
        self.expect("module", "'module'")
        self.expect("@")
        name = self.match(_IDENT, "a module name")
        self.expect("{")
        self.expect("func.func", "'func.func'")
        self.expect("@main", "'@main'")
        self.expect("(")
        names, types, positions = self.arg_list()
        self.expect("->")
        results_pos = self.pos
        result_types = self.type_list()
        self.expect("{")
        module = Module(name, types, names, weights)
        for arg, arg_name, pos in zip(module.body.args, names, positions, strict=True):
            self.define(arg_name, arg, pos)
        while not self.peek("}"):
            module.body.append(self.op())
        last = module.body.terminator
        if last is not None and last.name != "func.return":
            raise self.error(f"expected the body to end with 'func.return', got '{last.name}'")
        self.expect("}")
        self.expect("}")
        self.skip()
        if self.pos != len(self.text):
            raise self.error(f"expected end of input after the module, got {self.found()}")
        got = module.output_types if module.body.ops else []
        if len(got) != len(result_types) or not all(
                a.same_as(b) for a, b in zip(got, result_types, strict=True)):
            raise self.error("function result types do not match func.return operands: "
                             f"declared ({', '.join(map(str, result_types))}), returned "
                             f"({', '.join(map(str, got))})", results_pos)
        return module


def parse(text: str, weights: Mapping[str, np.ndarray] | None = None,
          verify_module: bool = True) -> Module:
    """Parse a module from its text form (weights are attached by name), then verify it.

    Every failure is a ParseError with line and column: text that is not a module, or (a
    TextVerifyError, also a VerifyError) a module that breaks an IR rule, at the op that
    breaks it."""
    parser = Parser(text)
    try:
        module = parser.module(weights)
    except ParseError:
        raise
    except IRError as exc:  # a rule the grammar leaves to the IR (no func.return, ...)
        raise parser.error(str(exc)) from None
    except (RecursionError, ArithmeticError, ValueError, TypeError, LookupError,
            AttributeError) as exc:  # the last line of defence: the grammar bounds all this
        raise parser.error(f"cannot parse this text: {type(exc).__name__}: {exc}") from None
    if verify_module:
        _verify(module, parser)
    return module


def _verify(module: Module, parser: Parser) -> None:
    """`verify`, where an op whose rules crash on what the text gave it is a ParseError at
    that op (its attributes or types are what the op's checks could not take)."""
    try:
        verify(module)
    except VerifyError as exc:  # at the op's place in the text
        pos = parser.op_positions.get(exc.op, 0) if isinstance(exc.op, Operation) else 0
        where = parser.error(str(exc), pos)
        raise TextVerifyError(where.line, where.col, str(exc), where.source_line,
                              exc.op) from None
    except (IRError, RecursionError, ArithmeticError, ValueError, TypeError, LookupError,
            AttributeError) as exc:
        op = next((op for op in module.walk() if _crashes(op)), None)
        pos = parser.op_positions.get(op, 0) if op is not None else 0
        what = f"op '{op.name}'" if op is not None else "the module"
        raise parser.error(f"{what} cannot be verified: {type(exc).__name__}: {exc}",
                           pos) from None


def _crashes(op: Operation) -> bool:
    try:
        op.verify()
    except VerifyError:
        return False
    except Exception:  # any crash: this looks for the op whose checks crash, to name it
        return True
    return False
