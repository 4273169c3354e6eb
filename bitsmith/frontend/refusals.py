"""What a model may do in torch that a compiled graph cannot, refused on one line each.

- Data-dependent control flow: a Python branch on a tensor value, or `.item()`/`int()`/`bool()`
  of one. torch.export cannot trace it; bitsmith names the user's line and the fix (torch.where
  or a static condition). While tracing, torch's own account of a failure (a partial
  graph printed to stderr, warnings logged) is held back: it is let out only when the trace works.
- In-place updates of an input or a buffer (`x.mul_(2)`, `self.count.add_(1)`): torch.export
  turns them into extra outputs (BUFFER_MUTATION, USER_INPUT_MUTATION); a compiled model is a pure
  function of its inputs. In-place ops on intermediates are fine (functionalized away).
- Outputs a flat tuple of tensors would misrepresent: a compiled model returns a flat tuple, so
  nested tuples and lists flatten (in order), as does a transformers ModelOutput (which indexes
  like its `to_tuple()`); a dict, namedtuple, dataclass or constant (None, a number) is refused
  unless the caller asks to flatten on purpose.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import sysconfig
import threading
import traceback
from collections.abc import Iterator
from typing import Any, TextIO, cast

import torch
from torch import fx
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils._pytree import TreeSpec

from ..errors import ModelError, UnsupportedModelError

DATA_DEPENDENT = (GuardOnDataDependentSymNode, DataDependentOutputException)
MODEL_OUTPUT = "transformers.utils.generic.ModelOutput"
# frames in these folders are not the model's code (installed packages such as transformers are)
_TORCH = os.path.dirname(torch.__file__) + os.sep
_FRONTEND = os.path.dirname(__file__) + os.sep  # bitsmith/models (the zoo) is model code
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
_PACKAGES = tuple(sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib"))


# --- tracing --------------------------------------------------------------------------------


class _HeldRecords(logging.Handler):
    """Keeps the log records torch emits while tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _HeldStream:
    """sys.stderr while tracing: what the tracing thread writes is held, what other threads
    write (a CLI progress spinner) goes through."""

    def __init__(self, real: TextIO) -> None:
        self.real, self.thread, self.held = real, threading.get_ident(), io.StringIO()

    def write(self, text: str) -> int:
        if threading.get_ident() == self.thread:
            return self.held.write(text)
        return self.real.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextlib.contextmanager
def held_back_output() -> Iterator[None]:
    """Hold what torch writes to stderr and logs while tracing: let out when the block ends
    normally, dropped when it raises (the partial graph and warnings of a failed trace).
    It swaps process-wide state (sys.stderr, torch's log handlers): one trace at a time."""
    loggers = [lg for name, lg in list(logging.Logger.manager.loggerDict.items())
               if (name == "torch" or name.startswith("torch."))
               and isinstance(lg, logging.Logger) and lg.handlers]
    saved = {lg: lg.handlers for lg in loggers}
    records, stream = _HeldRecords(), _HeldStream(sys.stderr)
    for lg in loggers:
        lg.handlers = [records]
    try:
        with contextlib.redirect_stderr(cast(TextIO, stream)):
            yield
    finally:
        for lg, handlers in saved.items():
            lg.handlers = handlers
    sys.stderr.write(stream.held.getvalue())
    for record in records.records:
        logging.getLogger(record.name).callHandlers(record)


def export_error(model: torch.nn.Module, exc: Exception) -> ModelError:
    """The one-line error for a failed torch.export of `model`."""
    name = type(model).__name__
    if isinstance(exc, DATA_DEPENDENT):
        return UnsupportedModelError(_data_dependent(name, exc))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ModelError(f"torch.export could not trace {name}: {type(exc).__name__}: {first}")


def _data_dependent(name: str, exc: Exception) -> str:
    where, source = _user_frame(exc)
    if re.match(r"(if|elif|while|assert)\b", source) or re.search(r"\bif\b.+\belse\b", source):
        construct = "a Python branch on a tensor value"
    elif isinstance(exc, DataDependentOutputException):
        construct = f"{str(exc).strip() or 'an op'}, whose Python result depends on tensor values"
    else:
        construct = "a tensor value read as a Python number (.item(), int(), bool())"
    at = f" at {where}" + (f" (`{source}`)" if source else "") if where else ""
    # not torch.cond: it traces, but bitsmith cannot import its subgraphs
    return (f"{name} has data-dependent control flow{at}: {construct} cannot be traced into "
            "one graph; compute both sides and select with torch.where(cond, a, b), or make "
            "the condition static (depend on shapes or constants, not tensor values)")


def _user_frame(exc: Exception) -> tuple[str, str]:
    """(file:line, source line) of the innermost frame of user code that raised `exc`."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if _is_user_file(frame.filename):
            return f"{frame.filename}:{frame.lineno}", (frame.line or "").strip()
    found = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', str(exc))
    return (f"{found[-1][0]}:{found[-1][1]}", found[-1][2].strip()) if found else ("", "")


def _is_user_file(path: str) -> bool:
    if path.startswith(("<", _TORCH, _FRONTEND)):
        return False
    return not path.startswith(_STDLIB) or path.startswith(_PACKAGES)


# --- the exported program -------------------------------------------------------------------

_MUTATED = {OutputKind.BUFFER_MUTATION: "buffer", OutputKind.PARAMETER_MUTATION: "parameter",
            OutputKind.USER_INPUT_MUTATION: "input"}


def refuse_mutations(ep: ExportedProgram, name: str) -> None:
    """Refuse an in-place update of an input, buffer or parameter (an extra output in torch's
    graph signature)."""
    nodes = {n.name: n for n in ep.graph_module.graph.nodes}
    for spec in ep.graph_signature.output_specs:
        kind = _MUTATED.get(spec.kind)
        if kind is None:
            continue
        node = nodes.get(getattr(spec.arg, "name", ""))
        where = node_location(node) if node is not None else ""
        target = str(spec.target)
        ref = target if kind == "input" else f"self.{target}"
        raise UnsupportedModelError(
            f"{name} updates its {kind} '{target}' in place{where}: a compiled model cannot "
            f"change its {kind}s; modify a copy (`{target.rsplit('.', 1)[-1]} = {ref}.clone()` "
            "first) or use the out-of-place form of the op (the one without the trailing "
            "underscore), or return the new value as an output instead")


def refuse_lost_structure(ep: ExportedProgram, name: str) -> None:
    """Refuse an output structure that a flat tuple of tensors would misrepresent."""
    lost = _lost_structure(ep.call_spec.out_spec)
    if lost is not None:
        what, fix = _describe(lost)
        raise UnsupportedModelError(
            f"{name} returns {what}, which a compiled model cannot keep (it returns a flat tuple "
            f"of tensors): return a tuple of tensors instead ({fix}), or ask for flat outputs "
            "on purpose (from_torch(..., flatten_outputs=True))")


def _lost_structure(spec: TreeSpec | None) -> TreeSpec | None:
    """The first container in `spec` that is neither a tuple, a list, one of torch's
    positional return tuples (`torch.return_types.topk`) nor a ModelOutput."""
    if spec is None or spec.is_leaf():
        return None
    if not (spec.type in (tuple, list) or _is_model_output(spec.type)
            or getattr(spec.type, "__module__", "") == "torch.return_types"):  # topk, max...
        return spec
    for child in spec.children():
        lost = _lost_structure(child)
        if lost is not None:
            return lost
    return None


def _is_model_output(kind: Any) -> bool:
    mro = getattr(kind, "__mro__", ())
    return any(f"{c.__module__}.{c.__qualname__}" == MODEL_OUTPUT for c in mro)


def _describe(spec: TreeSpec) -> tuple[str, str]:
    """(what the container is, how to return it as a tuple)."""
    context = spec.context
    if isinstance(spec.type, type) and issubclass(spec.type, dict):
        keys = [repr(k) for k in context or []]
        return (f"a {spec.type.__name__} (keys {', '.join(keys)})",
                f"`return {', '.join(f'out[{k}]' for k in keys)}`")
    if isinstance(context, type) and issubclass(context, tuple):  # a namedtuple's class
        fields = ", ".join(getattr(context, "_fields", ()))
        return f"a namedtuple {context.__name__} (fields {fields})", "`return tuple(out)`"
    kind = getattr(spec.type, "__name__", str(spec.type))
    return f"a {kind}", "return its tensors one by one"


def constant_output_error(item: Any, position: int, name: str) -> UnsupportedModelError:
    """A constant (None, a number) among the outputs, which the flat tuple would drop."""
    return UnsupportedModelError(
        f"{name} returns {item!r} as output {position}, which is not a tensor: a compiled model "
        "returns tensors only; drop it from the return (or ask for flat outputs on purpose: "
        "from_torch(..., flatten_outputs=True))")


def node_location(node: fx.Node) -> str:
    """' at file:line (`source`)' of the user code a node was traced from, or ''."""
    trace = node.meta.get("stack_trace") or ""
    found = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    if not found:
        return ""
    path, line, source = found[-1]
    return f" at {path}:{line}" + (f" (`{source.strip()}`)" if source.strip() else "")
