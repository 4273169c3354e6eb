"""Values, operations, blocks, regions and modules, with use-def chains kept by the IR itself."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from ..errors import IRError, VerifyError
from .attributes import Attribute, DenseAttr, normalize_attr
from .dtypes import DType
from .types import TensorType

if TYPE_CHECKING:
    from .interpreter import EvalContext


class Value:
    """An SSA value: an op result or a block argument; knows every use of itself."""

    __slots__ = ("type", "uses", "name_hint")

    def __init__(self, type: TensorType, name_hint: str | None = None) -> None:
        self.type = type
        self.uses: list[tuple[Operation, int]] = []
        self.name_hint = name_hint

    @property
    def users(self) -> list[Operation]:
        """The ops that use this value, each once, in use order."""
        return list(dict.fromkeys(op for op, _ in self.uses))

    def replace_all_uses_with(self, new: Value) -> None:
        """Point every use of this value at `new` instead."""
        if new is self:
            return
        for op, index in list(self.uses):
            op.set_operand(index, new)


class OpResult(Value):
    """The `index`-th result of an op."""

    __slots__ = ("op", "index")

    def __init__(self, type: TensorType, op: Operation, index: int) -> None:
        super().__init__(type)
        self.op, self.index = op, index


class BlockArgument(Value):
    """The `index`-th argument of a block."""

    __slots__ = ("block", "index")

    def __init__(self, type: TensorType, block: Block, index: int, name: str | None) -> None:
        super().__init__(type, name)
        self.block, self.index = block, index


REQUIRED = object()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_ATTR_KINDS: dict[str, Any] = {
    "int": _is_int,
    "float": lambda v: isinstance(v, float),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, tuple) and all(_is_int(x) for x in v),
    "floats": lambda v: isinstance(v, tuple) and all(isinstance(x, float) for x in v),
    "dtype": lambda v: isinstance(v, DType),
    "dense": lambda v: isinstance(v, DenseAttr),
    "any": lambda v: True,
}


@dataclass(frozen=True, slots=True)
class AttrSpec:
    """Declares one attribute: its kind, default and allowed values."""

    kind: str  # int float bool str ints floats dtype dense any
    default: Any = REQUIRED
    choices: tuple = ()
    optional: bool = False  # None is allowed

    def check(self, op: Operation, name: str, value: Attribute) -> None:
        """Raise VerifyError when `value` does not fit this spec."""
        if value is None and (self.optional or self.default is None):
            return
        ok = _ATTR_KINDS[self.kind](value)
        if not ok:
            raise VerifyError(op, f"attribute '{name}' expected {self.kind}, got {value!r}")
        if self.choices and value not in self.choices:
            raise VerifyError(op, f"attribute '{name}' expected one of {list(self.choices)}, "
                                  f"got {value!r}")


def attr(kind: str, default: Any = REQUIRED, *, choices: tuple = (),
         optional: bool = False) -> AttrSpec:
    """Shorthand for an AttrSpec in an op's ATTRS table."""
    return AttrSpec(kind, default, choices, optional)


class Trait(Enum):
    """What kind an op is, declared on its class (MLIR traits, in our words). Fusion, the
    op-kind classifier and both backends' templates ask the op (`op.has(Trait.X)`), never a
    list of op names."""

    ELEMENTWISE = "elementwise"  # out[i] = f(operands[i]), operands broadcast numpy-style
    BROADCAST = "broadcast"  # elementwise after repeating an operand along axes (batch_norm)
    INJECTIVE = "injective"  # each output element reads at most one element of each input
    VIEW = "view"  # only re-indexes its one operand, computes nothing (reshape, permute)
    REDUCTION = "reduction"  # output elements combine input elements along axes
    SCAN = "scan"  # a running combination along one axis (cumsum): fuses with nothing
    SOURCE = "source"  # no tensor operands: values come from attributes (constant, full)
    ANCHOR = "anchor"  # a fusion anchor (`ANCHOR` says which kind): absorbs an epilogue
    NCHW = "nchw"  # an image op over NCHW input that the layout pass may run in NHWC
    PAD_PROLOGUE = "pad-prologue"  # its kernel reads its input through a fused graph.pad
    TERMINATOR = "terminator"  # ends a block (func.return, kernel.yield)
    REGION = "region"  # holds ops of its own (kernel.fused)


class Anchor(Enum):
    """The kind of computation a fusion anchor is, which decides its kernel template family."""

    MATMUL = "matmul"
    CONV = "conv"
    POOL = "pool"
    ATTENTION = "attention"


OP_REGISTRY: dict[str, type[Operation]] = {}
OpT = TypeVar("OpT", bound="Operation")


def register_op(cls: type[OpT]) -> type[OpT]:
    """Class decorator: make an op kind known to the parser and the dialect registry."""
    if cls.name in OP_REGISTRY and OP_REGISTRY[cls.name] is not cls:
        raise IRError(f"op '{cls.name}' registered twice")
    if (cls.ANCHOR is not None) != (Trait.ANCHOR in cls.TRAITS):
        raise IRError(f"op '{cls.name}': Trait.ANCHOR and an ANCHOR kind go together, got "
                      f"traits {sorted(t.value for t in cls.TRAITS)} and ANCHOR={cls.ANCHOR}")
    OP_REGISTRY[cls.name] = cls
    return cls


def ops_with(trait: Trait) -> tuple[type[Operation], ...]:
    """Every registered op class that carries `trait`, by name."""
    return tuple(OP_REGISTRY[name] for name in sorted(OP_REGISTRY) if trait in
                 OP_REGISTRY[name].TRAITS)


def dialects() -> dict[str, list[str]]:
    """Registered op names grouped by dialect prefix."""
    out: dict[str, list[str]] = {}
    for name in sorted(OP_REGISTRY):
        out.setdefault(name.split(".", 1)[0], []).append(name)
    return out


class Operation:
    """An op: operands, results, attributes, regions and a source location.

    Subclasses declare their operands (`OPERANDS`: names, `name?` optional, `*name` variadic,
    in that order), attributes (`ATTRS`) and implement `infer_types`, `verify_` and `evaluate`.
    """

    name: ClassVar[str] = "builtin.op"
    OPERANDS: ClassVar[tuple[str, ...]] = ()
    ATTRS: ClassVar[dict[str, AttrSpec]] = {}
    NUM_REGIONS: ClassVar[int] = 0
    RESULT_TYPES_GIVEN: ClassVar[bool] = False  # result types come from the builder
    NUM_RESULTS: ClassVar[int | None] = 1  # None: variadic
    TRAITS: ClassVar[frozenset[Trait]] = frozenset()
    ANCHOR: ClassVar[Anchor | None] = None  # the anchor kind of a Trait.ANCHOR op

    __slots__ = ("_operands", "results", "attributes", "regions", "loc", "parent")

    def __init__(self, operands: Sequence[Value], result_types: Sequence[TensorType],
                 attributes: dict[str, Attribute], regions: Sequence[Region] = (),
                 loc: str | None = None) -> None:
        self._operands: list[Value] = []
        self.attributes = {k: normalize_attr(v) for k, v in attributes.items()}
        self.results = [OpResult(t, self, i) for i, t in enumerate(result_types)]
        self.regions = list(regions)
        for region in self.regions:
            region.parent = self
        self.loc = loc
        self.parent: Block | None = None
        for value in operands:
            self._operands.append(value)
            value.uses.append((self, len(self._operands) - 1))

    @classmethod
    def has(cls, *traits: Trait) -> bool:
        """True when the op carries any of `traits`."""
        return not cls.TRAITS.isdisjoint(traits)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, *operands: Value | None, loc: str | None = None,
               result_types: Sequence[TensorType] | None = None,
               regions: Sequence[Region] = (), **attrs: Any) -> Self:
        """Build an op from operands and attributes, filling defaults and inferring types."""
        present = cls._pack_operands(operands)
        full = cls._with_defaults(attrs)
        if result_types is None:
            if cls.RESULT_TYPES_GIVEN:
                raise IRError(f"'{cls.name}' needs explicit result_types")
            probe = cls(present, [], full, regions, loc)
            probe._verify_operand_count()
            result_types = probe.infer_types()
            probe.drop_operand_uses()
            for region in probe.regions:
                region.parent = None
        return cls(present, list(result_types), full, regions, loc)

    @classmethod
    def _pack_operands(cls, operands: Sequence[Value | None]) -> list[Value]:
        present: list[Value] = []
        for i, value in enumerate(operands):
            spec = cls.OPERANDS[min(i, len(cls.OPERANDS) - 1)] if cls.OPERANDS else "?"
            if value is None:
                if not spec.endswith("?"):
                    raise IRError(f"'{cls.name}' operand '{spec}' may not be None")
                if any(v is not None for v in operands[i + 1:]):
                    raise IRError(f"'{cls.name}': an absent optional operand must come last")
                break
            present.append(value)
        return present

    @classmethod
    def _with_defaults(cls, attrs: dict[str, Any]) -> dict[str, Attribute]:
        unknown = set(attrs) - set(cls.ATTRS)
        if unknown:
            raise IRError(f"'{cls.name}' has no attribute(s) {sorted(unknown)}; "
                          f"valid: {sorted(cls.ATTRS)}")
        full: dict[str, Attribute] = {}
        for key, spec in cls.ATTRS.items():
            if key in attrs:
                value = normalize_attr(attrs[key])
                if spec.kind == "float" and isinstance(value, int) and not isinstance(value,
                                                                                      bool):
                    value = float(value)
                if spec.kind == "floats" and isinstance(value, tuple):
                    value = tuple(float(v) for v in value)
                full[key] = value
            elif spec.default is REQUIRED:
                raise IRError(f"'{cls.name}' needs attribute '{key}' ({spec.kind})")
            else:
                full[key] = spec.default
        return full

    # ---- operands -----------------------------------------------------------------------
    @property
    def operands(self) -> tuple[Value, ...]:
        """The operand values, in order."""
        return tuple(self._operands)

    def set_operand(self, index: int, value: Value) -> None:
        """Replace one operand, keeping both values' use lists current."""
        old = self._operands[index]
        old.uses.remove((self, index))
        self._operands[index] = value
        value.uses.append((self, index))

    def drop_operand_uses(self) -> None:
        """Forget this op as a user of its operands (and of those of nested ops)."""
        for index, value in enumerate(self._operands):
            if (self, index) in value.uses:
                value.uses.remove((self, index))
        for region in self.regions:
            for block in region.blocks:
                for op in block.ops:
                    op.drop_operand_uses()

    def operand(self, name: str) -> Value | None:
        """An operand by its declared name (None for an absent optional one)."""
        for index, spec in enumerate(self.OPERANDS):
            key = spec.strip("*?")
            if key == name:
                if spec.startswith("*"):
                    raise IRError(f"'{self.name}' operand '{name}' is variadic; use .variadic()")
                return self._operands[index] if index < len(self._operands) else None
        raise AttributeError(f"'{self.name}' has no operand '{name}'")

    def variadic(self) -> tuple[Value, ...]:
        """The operands bound to the trailing `*name` entry of OPERANDS."""
        return tuple(self._operands[len(self.OPERANDS) - 1:])

    def __getattr__(self, key: str) -> Any:
        cls = type(self)
        if key in cls.ATTRS:
            return self.attributes[key]
        if any(spec.strip("*?") == key for spec in cls.OPERANDS):
            return self.operand(key)
        raise AttributeError(f"'{cls.name}' op has no operand or attribute '{key}'")

    # ---- results and structure ----------------------------------------------------------
    @property
    def result(self) -> OpResult:
        """The single result (an error for ops with several)."""
        if len(self.results) != 1:
            raise IRError(f"'{self.name}' has {len(self.results)} results, not one")
        return self.results[0]

    def walk(self) -> Iterator[Operation]:
        """This op and every op nested in its regions, pre-order."""
        yield self
        for region in self.regions:
            for block in region.blocks:
                for op in list(block.ops):
                    yield from op.walk()

    def erase(self) -> None:
        """Remove this op; its results must have no uses left."""
        for result in self.results:
            if result.uses:
                users = ", ".join(sorted({u.name for u in result.users}))
                raise IRError(f"cannot erase '{self.name}': result #{result.index} still used "
                              f"by {users}")
        self.drop_operand_uses()
        if self.parent is not None:
            self.parent.ops.remove(self)
            self.parent = None

    # ---- semantics, overridden by op kinds ----------------------------------------------
    def infer_types(self) -> list[TensorType]:
        """The result types implied by operands and attributes."""
        return [r.type for r in self.results]

    def verify_(self) -> None:
        """Op-specific checks beyond operand counts, attributes and inferred types."""

    def evaluate(self, ctx: EvalContext, *args: Any, **kwargs: Any) -> Any:
        """Numpy semantics: return an array (one result) or a tuple of arrays.

        The interpreter passes one array per operand; each op kind names them in its own
        signature (`evaluate(self, ctx, lhs, rhs)`). `*args: Any, **kwargs: Any` is the typing
        spelling of "any parameters", which lets those overrides type-check."""
        raise IRError(f"op '{self.name}' has no interpreter semantics")

    def verify(self) -> None:
        """Check operand count, attributes, regions and result types, then op rules."""
        self._verify_operand_count()
        for key, spec in self.ATTRS.items():
            if key not in self.attributes:
                raise VerifyError(self, f"missing attribute '{key}'")
            spec.check(self, key, self.attributes[key])
        unknown = set(self.attributes) - set(self.ATTRS)
        if unknown:
            raise VerifyError(self, f"unknown attribute(s) {sorted(unknown)}; "
                                    f"valid: {sorted(self.ATTRS)}")
        if len(self.regions) != self.NUM_REGIONS:
            raise VerifyError(self, f"expected {self.NUM_REGIONS} region(s), "
                                    f"got {len(self.regions)}")
        if self.NUM_RESULTS is not None and len(self.results) != self.NUM_RESULTS:
            raise VerifyError(self, f"expected {self.NUM_RESULTS} result(s), "
                                    f"got {len(self.results)}")
        self.verify_()
        if not self.RESULT_TYPES_GIVEN:
            inferred = self.infer_types()
            got = [r.type for r in self.results]
            if len(inferred) != len(got) or not all(
                    a.same_as(b) for a, b in zip(inferred, got, strict=True)):
                raise VerifyError(self, "result type mismatch: inferred "
                                        f"({', '.join(map(str, inferred))}), "
                                        f"got ({', '.join(map(str, got))})")

    def _verify_operand_count(self) -> None:
        specs = self.OPERANDS
        required = sum(1 for s in specs if not s.endswith("?") and not s.startswith("*"))
        variadic = bool(specs) and specs[-1].startswith("*")
        most = None if variadic else len(specs)
        n = len(self._operands)
        if n < required or (most is not None and n > most):
            want = f"{required}" if most == required else f"{required}..{most or 'n'}"
            raise VerifyError(self, f"expected {want} operand(s) ({', '.join(specs)}), got {n}")

    def __repr__(self) -> str:
        return f"<{self.name} at {self.loc or '?'}>"


class Block:
    """A list of ops with typed arguments."""

    __slots__ = ("args", "ops", "parent")

    def __init__(self, arg_types: Sequence[TensorType] = (),
                 arg_names: Sequence[str | None] | None = None) -> None:
        names = list(arg_names) if arg_names is not None else [None] * len(arg_types)
        self.args = [BlockArgument(t, self, i, n)
                     for i, (t, n) in enumerate(zip(arg_types, names, strict=True))]
        self.ops: list[Operation] = []
        self.parent: Region | None = None

    def append(self, op: Operation) -> Operation:
        """Add an op at the end."""
        return self.insert(len(self.ops), op)

    def insert(self, index: int, op: Operation) -> Operation:
        """Add an op at a position."""
        if op.parent is not None:
            raise IRError(f"'{op.name}' already belongs to a block")
        self.ops.insert(index, op)
        op.parent = self
        return op

    def index(self, op: Operation) -> int:
        """Position of an op in this block."""
        for i, candidate in enumerate(self.ops):
            if candidate is op:
                return i
        raise IRError(f"'{op.name}' is not in this block")

    @property
    def terminator(self) -> Operation | None:
        """The last op, if any."""
        return self.ops[-1] if self.ops else None


class Region:
    """A list of blocks owned by an op (bitsmith uses single-block regions)."""

    __slots__ = ("blocks", "parent")

    def __init__(self, blocks: Sequence[Block] = ()) -> None:
        self.blocks = list(blocks)
        for block in self.blocks:
            block.parent = self
        self.parent: Operation | None = None

    @property
    def block(self) -> Block:
        """The single block."""
        if len(self.blocks) != 1:
            raise IRError(f"region has {len(self.blocks)} blocks, expected 1")
        return self.blocks[0]
