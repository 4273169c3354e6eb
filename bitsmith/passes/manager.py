"""The pass manager: registered, stateless passes run in order with verification, IR dumps,
timing and statistics."""
from __future__ import annotations

import difflib
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import PassError, PipelineError
from ..ir import Module, VerifyError, verify
from .pipeline import (
    PipelineEntry,
    convert_option,
    format_option,
    format_pipeline,
    option_fields,
    split_pipeline,
)


@dataclass
class PassContext:
    """What a pass may report while it runs: statistics and remarks (e.g. fusion decisions)."""

    pass_name: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    remarks: list[str] = field(default_factory=list)

    def count(self, stat: str, n: int = 1) -> None:
        """Add `n` to a named statistic (e.g. "ops-removed", "kernels-formed")."""
        self.stats[stat] = self.stats.get(stat, 0) + n

    def remark(self, text: str) -> None:
        """Record a human-readable note (printed by `--explain-fusion` and friends)."""
        self.remarks.append(text)


class ModulePass:
    """Base of passes: a frozen dataclass whose fields are its options.

    Subclasses set `NAME` (via `register_pass`) and implement `run`, which rewrites the module
    in place. Passes hold no state between runs.
    """

    NAME: ClassVar[str] = ""

    def run(self, module: Module, ctx: PassContext) -> None:
        """Rewrite `module` in place, reporting statistics into `ctx`."""
        raise NotImplementedError

    def entry(self) -> PipelineEntry:
        """This pass as a pipeline entry, listing options that differ from the defaults."""
        opts = tuple((key, getattr(self, f.name)) for key, f in option_fields(type(self)).items()
                     if getattr(self, f.name) != f.default)
        return PipelineEntry(self.NAME, opts)

    def __str__(self) -> str:
        return str(self.entry())


PASS_REGISTRY: dict[str, type[ModulePass]] = {}


def register_pass(name: str) -> Callable[[type[ModulePass]], type[ModulePass]]:
    """Class decorator: make a pass available under `name` in pipeline strings."""
    def wrap(cls: type[ModulePass]) -> type[ModulePass]:
        if name in PASS_REGISTRY and PASS_REGISTRY[name] is not cls:
            raise PassError(f"pass '{name}' registered twice")
        cls.NAME = name
        PASS_REGISTRY[name] = cls
        return cls
    return wrap


def _suggest(word: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def make_pass(entry: PipelineEntry) -> tuple[ModulePass, PipelineEntry]:
    """Instantiate the pass an entry names, converting and checking its options.

    Returns the pass and the entry with typed option values (for printing back).
    """
    cls = PASS_REGISTRY.get(entry.name)
    if cls is None:
        raise PipelineError(f"unknown pass '{entry.name}'{_suggest(entry.name, PASS_REGISTRY)};"
                            f" valid passes: {', '.join(sorted(PASS_REGISTRY))}")
    fields = option_fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    typed: list[tuple[str, Any]] = []
    for key, raw in entry.options:
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise PipelineError(f"pass '{entry.name}' has no option '{key}'"
                                f"{_suggest(key, fields)}; valid options: {valid}")
        f = fields[key]
        value = raw if not isinstance(raw, str) else convert_option(entry.name, key, raw,
                                                                      hints[f.name])
        kwargs[f.name] = value
        typed.append((key, value))
    try:
        return cls(**kwargs), PipelineEntry(entry.name, tuple(typed))
    except (PipelineError, ValueError, TypeError) as exc:
        raise PipelineError(f"pass '{entry.name}': {exc}") from None


@dataclass(frozen=True)
class Pipeline:
    """Passes to run in order, with the options as the user spelled them."""

    passes: tuple[ModulePass, ...]
    entries: tuple[PipelineEntry, ...]

    @classmethod
    def of(cls, passes: Sequence[ModulePass]) -> Pipeline:
        """A pipeline of pass objects (options at their defaults are left out of its text)."""
        return cls(tuple(passes), tuple(p.entry() for p in passes))

    def __str__(self) -> str:
        return format_pipeline(list(self.entries))


def parse_pipeline(text: str) -> Pipeline:
    """Parse a pipeline string (errors list the valid passes and options)."""
    made = [make_pass(e) for e in split_pipeline(text)]
    return Pipeline(tuple(p for p, _ in made), tuple(e for _, e in made))


def print_pipeline(pipeline: Pipeline | Sequence[ModulePass]) -> str:
    """The canonical text of a pipeline."""
    return str(pipeline if isinstance(pipeline, Pipeline) else Pipeline.of(pipeline))


@dataclass(frozen=True, slots=True)
class PassRecord:
    """What one pass did: wall time, op counts and its statistics and remarks."""

    name: str
    seconds: float
    ops_before: int
    ops_after: int
    stats: dict[str, int]
    remarks: tuple[str, ...]


@dataclass
class PipelineReport:
    """The records of a pipeline run, in order."""

    records: list[PassRecord] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Total wall time of the passes."""
        return sum(r.seconds for r in self.records)

    def remarks(self, pass_name: str | None = None) -> list[str]:
        """All remarks, or those of one pass (by pipeline name)."""
        return [text for r in self.records if pass_name in (None, r.name.split("{")[0])
                for text in r.remarks]

    def table(self) -> str:
        """A plain-text table: pass, time, ops before -> after, statistics."""
        width = max((len(r.name) for r in self.records), default=4)
        lines = [f"{'pass':<{width}}  {'ms':>8}  {'ops':>11}  statistics"]
        for r in self.records:
            stats = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
            lines.append(f"{r.name:<{width}}  {r.seconds * 1e3:8.1f}  "
                         f"{r.ops_before:>5}->{r.ops_after:<5}  {stats}")
        return "\n".join(lines)


def count_ops(module: Module) -> int:
    """Ops in the module, nested ones included, without the terminator."""
    return sum(1 for op in module.walk() if op.name not in ("func.return", "kernel.yield"))


class PassManager:
    """Runs passes in order, verifying after each and dumping IR where asked."""

    def __init__(self, pipeline: str | Pipeline | Sequence[ModulePass], *, verify: bool = True,
                 print_ir_after: Iterable[str] | bool = (),
                 printer: Callable[[str], None] = print) -> None:
        if isinstance(pipeline, str):
            pipeline = parse_pipeline(pipeline)
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline.of(pipeline)
        self.verify = verify
        if isinstance(print_ir_after, bool):
            self.print_after: set[str] | None = None if print_ir_after else set()
        else:
            self.print_after = set(print_ir_after)
            present = {p.NAME for p in self.pipeline.passes}
            unknown = self.print_after - present
            if unknown:
                raise PipelineError(f"--print-ir-after names pass(es) {sorted(unknown)} that "
                                    f"the pipeline '{self.pipeline}' does not run; it runs: "
                                    f"{', '.join(sorted(present))}")
        self.printer = printer

    def __str__(self) -> str:
        return str(self.pipeline)

    def run(self, module: Module) -> PipelineReport:
        """Run every pass on `module` in place; return what each did."""
        report = PipelineReport()
        for p, entry in zip(self.pipeline.passes, self.pipeline.entries, strict=True):
            ctx = PassContext(p.NAME)
            before = count_ops(module)
            start = time.perf_counter()
            try:
                p.run(module, ctx)
            except PassError:
                raise
            except Exception as exc:  # a bug in a pass: say which one, keep the traceback
                raise PassError(f"pass '{entry}' failed: {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            if self.verify:
                try:
                    verify(module)
                except VerifyError as exc:
                    raise PassError(f"pass '{entry}' left invalid IR: {exc}") from exc
            report.records.append(PassRecord(str(entry), seconds, before, count_ops(module),
                                             dict(ctx.stats), tuple(ctx.remarks)))
            if self.print_after is None or p.NAME in self.print_after:
                self.printer(f"// ----- IR after {entry} -----\n{module}")
        return report


def run(module: Module, pipeline: str | Pipeline | Sequence[ModulePass], *,
        verify: bool = True) -> Module:
    """Run a pipeline on `module` in place and return it (for chaining)."""
    PassManager(pipeline, verify=verify).run(module)
    return module


DEFAULT_PIPELINES = {
    "cpu": "canonicalize,cse,layout{conv=nhwc},canonicalize,cse,dce,fuse,plan-memory",
    "gpu": "canonicalize,cse,dce,fuse,plan-memory",
    "cuda": "canonicalize,cse,dce,fuse,plan-memory",
}


def default_pipeline(target: str = "cpu") -> str:
    """The pipeline `bitsmith.compile` uses for a target ("cpu", or "gpu" / "cuda")."""
    if target not in DEFAULT_PIPELINES:
        raise PipelineError(f"no default pipeline for target '{target}'; "
                            f"valid: {', '.join(DEFAULT_PIPELINES)}")
    return DEFAULT_PIPELINES[target]


__all__ = ["PassContext", "ModulePass", "PASS_REGISTRY", "register_pass", "make_pass",
           "parse_pipeline", "print_pipeline", "Pipeline", "PassRecord", "PipelineReport",
           "PassManager", "run", "default_pipeline", "count_ops", "format_option"]
