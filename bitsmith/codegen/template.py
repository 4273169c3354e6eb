"""The kernel-template interface every backend implements (TVM on CPU, Triton on GPU).

A template recognises a family of `kernel.fused` regions (`match` -> a `Problem`), exposes its
knobs (`space`), says which configs make sense for a problem (`valid`) and builds a kernel for a
problem, a config and a target (`build`, pure in its arguments). `key` names the problem
parameters that make a tuned config reusable; bump `version` when the generated code changes so
that cached tunings are invalidated. The autotuner sees only this interface.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import CodegenError
from ..ir import Operation
from ..ir.dialects.kernel import FusedOp

Scalar = int | float | str | bool




@dataclass(frozen=True, slots=True)
class Knob:
    """One tunable parameter, named as the kernel parameter it sets (`TILE_M`, `UNROLL_K`)."""

    name: str
    choices: tuple[Scalar, ...]
    default: Scalar | None = None  # None: the first choice

    def __post_init__(self) -> None:
        if not self.choices:
            raise CodegenError(f"knob {self.name} has no choices")
        if len(set(self.choices)) != len(self.choices):
            raise CodegenError(f"knob {self.name} repeats a choice: {list(self.choices)}")
        if self.default is not None and self.default not in self.choices:
            raise CodegenError(f"knob {self.name}: default {self.default!r} is not one of "
                             f"{list(self.choices)}")

    @property
    def initial(self) -> Scalar:
        """The default choice."""
        return self.choices[0] if self.default is None else self.default


class Config(Mapping[str, Scalar]):
    """An immutable, hashable assignment of a value to every knob of a space."""

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, Scalar]) -> None:
        self._items = tuple(sorted(values.items()))

    def __getitem__(self, key: str) -> Scalar:
        for name, value in self._items:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._items == other._items

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self._items)})"

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self._items)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) for cache keys and databases."""
        return json.dumps(dict(self._items), sort_keys=True)


@dataclass(frozen=True)
class KnobSpace:
    """The cross product of a template's knobs."""

    knobs: tuple[Knob, ...]

    def __init__(self, *knobs: Knob) -> None:
        names = [k.name for k in knobs]
        if len(set(names)) != len(names):
            raise CodegenError(f"knob names repeat: {names}")
        object.__setattr__(self, "knobs", tuple(knobs))

    @property
    def size(self) -> int:
        """How many configs the space holds (before `valid` prunes)."""
        out = 1
        for knob in self.knobs:
            out *= len(knob.choices)
        return out

    def default(self) -> Config:
        """Every knob at its default: what runs untuned."""
        return Config({k.name: k.initial for k in self.knobs})

    def configs(self) -> Iterator[Config]:
        """Every config, in a fixed order."""
        names = [k.name for k in self.knobs]
        for values in itertools.product(*(k.choices for k in self.knobs)):
            yield Config(dict(zip(names, values, strict=True)))

    def check(self, config: Mapping[str, Scalar]) -> Config:
        """`config` as a Config of this space, or ValueError saying which knob is wrong."""
        want = {k.name: k for k in self.knobs}
        missing, extra = set(want) - set(config), set(config) - set(want)
        if missing or extra:
            raise CodegenError(f"config {dict(config)} does not fit the space: missing "
                             f"{sorted(missing)}, unknown {sorted(extra)}")
        for name, value in config.items():
            if value not in want[name].choices:
                raise CodegenError(f"knob {name}={value!r} is not one of "
                                 f"{list(want[name].choices)}")
        return Config(config)

    def to_json(self) -> str:
        """Canonical JSON of the knobs and their choices (part of every cache key)."""
        return json.dumps([[k.name, list(k.choices), k.initial] for k in self.knobs])


@dataclass(frozen=True)
class Problem:
    """What a template matched: the kernel op and its named sizes (M, N, K, bits, ...)."""

    template: str
    params: Mapping[str, Scalar]
    op: Operation | None = field(default=None, compare=False, hash=False)

    def __getitem__(self, key: str) -> Scalar:
        return self.params[key]

    @property
    def kernel_op(self) -> FusedOp:
        """The matched `kernel.fused` op, which building a kernel needs (a problem made from
        a cached key alone has none)."""
        if not isinstance(self.op, FusedOp):
            raise CodegenError(f"template {self.template}: the problem {dict(self.params)} "
                               f"carries no kernel.fused op to build a kernel from, got {self.op}")
        return self.op


@dataclass(frozen=True)
class Target:
    """Where kernels run: backend kind, CPU model and instruction sets, cores."""

    kind: str  # "llvm" or "cuda"
    mcpu: str = ""
    isa: tuple[str, ...] = ()
    cores: int = 1
    attrs: Mapping[str, Any] = field(default_factory=dict)


class KernelTemplate:
    """Base of templates; subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    space: ClassVar[KnobSpace] = KnobSpace()
    key: ClassVar[tuple[str, ...]] = ()
    precision: ClassVar[str] = "f32"
    """The arithmetic the template computes a contraction in: a kernel marked for another
    (`kernel.fused {precision = ...}`) is never this template's."""

    def match(self, op: Operation) -> Problem | None:
        """The problem a `kernel.fused` op poses to this template, or None if not its kind."""
        raise NotImplementedError

    def valid(self, problem: Problem, config: Config) -> bool:
        """Static pruning: False for configs that cannot work (e.g. a tile larger than N)."""
        return True

    def build(self, problem: Problem, config: Config, target: Target) -> Any:
        """The compiled kernel for (problem, config, target); raises CodegenError."""
        raise NotImplementedError

    def default_config(self, problem: Problem, target: Target) -> Config:
        """The config an untuned kernel runs: the space's defaults (templates refine this)."""
        return self.space.default()

    def problem_key(self, problem: Problem) -> tuple:
        """The values of `key` for a problem: equal keys may share a tuned config."""
        try:
            return tuple(problem.params[k] for k in self.key)
        except KeyError as exc:
            raise CodegenError(f"template {self.name}: problem lacks key parameter {exc}; "
                               f"has {sorted(problem.params)}") from None

    def valid_configs(self, problem: Problem) -> Iterator[Config]:
        """The configs of the space that `valid` keeps for `problem`."""
        return (c for c in self.space.configs() if self.valid(problem, c))


TEMPLATES: dict[str, KernelTemplate] = {}


def register_template(cls: type[KernelTemplate]) -> type[KernelTemplate]:
    """Class decorator: make a template available to `match_templates`."""
    if not cls.name:
        raise CodegenError(f"{cls.__name__} has no name")
    if cls.name in TEMPLATES and type(TEMPLATES[cls.name]) is not cls:
        raise CodegenError(f"template '{cls.name}' registered twice")
    TEMPLATES[cls.name] = cls()
    return cls


def match_templates(op: Operation) -> list[tuple[KernelTemplate, Problem]]:
    """Every registered template that matches `op`, in registration order."""
    out = []
    wanted = op.attributes.get("precision") or "f32"
    for template in TEMPLATES.values():
        if template.precision != wanted:
            continue
        problem = template.match(op)
        if problem is not None:
            out.append((template, problem))
    return out
