"""bitsmith's errors: one hierarchy under `BitsmithError`.

Every failure a user can cause (a bad model, input, artifact, spec, IR text or request) is a
subclass of `BitsmithError` whose message says what is wrong, where, expected vs got, and the
fix when it is known. The CLI prints any of them as one line with exit code 2. This module
imports nothing of ours, so every layer (the runtime included) can raise these.

```
BitsmithError
├── IRError            VerifyError, ParseError (TextVerifyError: both), InterpretError
│                      (IndexOutOfRangeError),
│                      DTypeError, ShapeError, PackingError, AttributeValueError
├── ModelError         ModelLoadError, UnsupportedOpError, UnsupportedModelError,
│                      ConversionError
├── PassError          PipelineError (+ QuantSpecError, MemoryPlanError in passes)
├── CodegenError
├── TuningError        CacheError
├── ArtifactError
├── InputError         arguments a compiled model cannot take
├── ServingError       InvalidRequest, QueueFull, DeadlineExceeded, LoadTestError
└── CliError
```
"""
from __future__ import annotations


class BitsmithError(Exception):
    """Base of every error bitsmith raises on purpose."""


# --- IR -------------------------------------------------------------------------------------


class IRError(BitsmithError):
    """Base class of the IR's errors."""


class VerifyError(IRError):
    """An op or module breaks an IR rule."""

    def __init__(self, op: object, message: str) -> None:
        self.op = op
        where = _describe(op)
        super().__init__(f"{where}: {message}" if where else message)


class ParseError(IRError):
    """Text that is not valid IR; carries line and column (1-based)."""

    def __init__(self, line: int, col: int, message: str, source_line: str = "") -> None:
        self.line, self.col, self.reason, self.source_line = line, col, message, source_line
        text = f"{line}:{col}: {message}"
        if source_line:
            text += f"\n  {source_line}\n  {' ' * (col - 1)}^"
        IRError.__init__(self, text)  # not super(): in TextVerifyError that is VerifyError's


class TextVerifyError(ParseError, VerifyError):
    """IR text that parses into a module breaking an IR rule: a ParseError at the op that
    breaks it (line and column) and a VerifyError naming the op and the rule."""

    def __init__(self, line: int, col: int, message: str, source_line: str = "",
                 op: object = None) -> None:
        self.op = op
        ParseError.__init__(self, line, col, message, source_line)


class InterpretError(IRError):
    """The reference interpreter could not run a module (bad inputs, missing weights)."""


class DTypeError(IRError, ValueError):
    """A dtype was misnamed, misbuilt, or asked to hold a value it cannot."""


class ShapeError(IRError, ValueError):
    """Shapes that do not fit together; ops turn it into a VerifyError."""


class IndexOutOfRangeError(InterpretError, IndexError):
    """An index operand points past the dim it indexes (torch raises IndexError there too)."""


class PackingError(IRError, ValueError):
    """Codes or packed words that do not fit the bit width or layout asked for."""


class AttributeValueError(IRError, TypeError):
    """A value that cannot be an op attribute (of the wrong type, or a literal that
    contradicts its type)."""


def _describe(op: object) -> str:
    name = getattr(op, "name", None)
    if name is None:
        return ""
    loc = getattr(op, "loc", None)
    return f"'{name}' op" + (f" at {loc}" if loc else "")


# --- models and import ----------------------------------------------------------------------


class ModelError(BitsmithError):
    """A model cannot be loaded or imported."""


class ModelLoadError(ModelError):
    """MODEL does not name a loadable model; the message says why and what is accepted."""


class ConversionError(ModelError):
    """One node could not be converted; the importer collects these."""


class UnsupportedModelError(ModelError):
    """The model does something a compiled graph cannot: data-dependent control flow, an
    in-place update of an input or buffer, an output structure a flat tuple would lose. The
    message names the construct, where it is (file:line) and the fix."""


class UnsupportedOpError(ModelError):
    """The model uses ATen ops (or op variants) that bitsmith cannot import yet."""

    def __init__(self, missing: dict[str, list[str]]) -> None:
        self.missing = missing
        lines = [f"{len(missing)} unsupported ATen op(s) in the model:"]
        for target, where in sorted(missing.items()):
            places = ", ".join(sorted(set(where))[:5])
            more = f" (+{len(set(where)) - 5} more)" if len(set(where)) > 5 else ""
            lines.append(f"  {target}  at {places}{more}")
        lines.append("add a converter in bitsmith/frontend/aten*.py or decompose the op "
                     "(frontend.importer.decomposition_table)")
        super().__init__("\n".join(lines))


# --- compiler -------------------------------------------------------------------------------


class PassError(BitsmithError):
    """A pass failed, or left the IR invalid; says which pass and what went wrong."""


class PipelineError(PassError):
    """A pipeline string names an unknown pass or option, or an option value is bad."""


class CodegenError(BitsmithError):
    """A template cannot build a kernel: names the template, the problem and the reason."""


class MismatchError(BitsmithError):
    """A compiled model computes something other than the torch model on its example inputs;
    the message names the output, the error, and the first kernel or imported op that
    diverges. Nothing is written or returned."""


class TuningError(BitsmithError):
    """A tuning or caching failure; the message says what failed, where, and the fix if known."""


class CacheError(TuningError):
    """The artifact cache cannot do what was asked (missing key, bad export file, ...)."""


# --- runtime --------------------------------------------------------------------------------


class ArtifactError(BitsmithError):
    """An artifact cannot be written or loaded; the message says why and what to do."""


class InputError(BitsmithError, ValueError):
    """Arguments a compiled model cannot take (count, dtype, shape, symbolic dims that disagree).

    Also a ValueError, which is what callers of a numpy-like function expect."""


# --- serving --------------------------------------------------------------------------------


class ServingError(BitsmithError):
    """Base of the serving stack's errors."""


class InvalidRequest(ServingError):
    """A request that cannot be served as sent: the message says why, `status` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class QueueFull(ServingError):
    """The queue holds `queue_size` requests; `retry_after` estimates seconds until it drains."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(ServingError):
    """A request's deadline passed; `unrun` when it was dropped from the queue unrun."""

    def __init__(self, unrun: bool) -> None:
        super().__init__("deadline exceeded " + ("in the queue" if unrun else "while running"))
        self.unrun = unrun


class LoadTestError(ServingError):
    """The load test cannot start: the message says why."""


# --- command line ---------------------------------------------------------------------------


class CliError(BitsmithError):
    """A user error of the command line that no other error describes: one line, exit code 2."""
