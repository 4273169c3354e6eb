"""A model as the server runs it: which dim is the batch, which batch sizes it runs at, and how
requests are stacked into one padded batch and the outputs split back.

The batch dim is dim 0 of every input and output when they agree on it: a symbol that appears
nowhere else (a dynamic-batch artifact: any size runs, and the server pads to a few sizes so
that each is warmed up and the executor keeps one arena per size), or the same int N (a static
artifact: requests of 1..N rows are padded to N). Otherwise the model is served without
batching: one request per run, at the artifact's own shapes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ServingError
from ..runtime.artifact import NUMPY_DTYPES, TensorSpec
from .kserve import InvalidRequest, Signature

RunFn = Callable[..., Sequence[np.ndarray]]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """The outputs of each request of a batch, or the exception that request alone raised."""

    results: tuple[list[np.ndarray] | BaseException, ...]
    rows: int  # real rows run
    padded: int  # rows of padding added
    retried: bool  # the batch failed and its requests ran one by one


class ServedModel:
    """A named model with its batching rules. `run` maps input arrays to output arrays (a
    CompiledModel's executor, or any function with that contract)."""

    def __init__(self, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 run: RunFn, *, max_batch: int = 32,
                 batch_sizes: Sequence[int] | None = None) -> None:
        if max_batch < 1:
            raise ServingError(f"max_batch must be >= 1, got {max_batch}")
        self.name, self.run = name, run
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        dim0 = {spec.shape[0] if spec.shape else None for spec in self.inputs + self.outputs}
        symbol = next(iter(dim0)) if len(dim0) == 1 else None
        self.dynamic = isinstance(symbol, str) and not any(
            symbol in str(d) for spec in self.inputs + self.outputs for d in spec.shape[1:])
        self.static = isinstance(symbol, int) and symbol >= 1
        self.batchable = self.dynamic or self.static
        if self.static:
            self.sizes: tuple[int, ...] = (int(symbol),)  # type: ignore[arg-type]
        elif self.dynamic:
            self.sizes = _sizes(max_batch, batch_sizes)
        else:
            self.sizes = ()
        self.max_rows = max(self.sizes, default=0)
        self.signature = Signature(self.inputs, self.outputs,
                                   tuple(self._variable(s) for s in self.inputs),
                                   tuple(self._variable(s) for s in self.outputs))

    @classmethod
    def from_compiled(cls, name: str, compiled: object, **options: object) -> ServedModel:
        """Serve a loaded CompiledModel under `name`."""
        manifest = compiled.artifact.manifest  # type: ignore[attr-defined]
        return cls(name, manifest.inputs, manifest.outputs,
                   compiled.executor.run, **options)  # type: ignore[attr-defined, arg-type]

    def _variable(self, spec: TensorSpec) -> tuple[bool, ...]:
        return tuple(isinstance(d, str) or (axis == 0 and self.static and self.max_rows > 1)
                     for axis, d in enumerate(spec.shape))

    def rows_of(self, arrays: Sequence[np.ndarray]) -> int:
        """The batch rows a request carries; raises InvalidRequest when there are too many or
        the inputs disagree on a dim they share."""
        bindings: dict[str, int] = {}
        for spec, array in zip(self.inputs, arrays, strict=True):
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, str) and not (axis == 0 and self.batchable):
                    bound = bindings.setdefault(dim, array.shape[axis])
                    if bound != array.shape[axis]:
                        raise InvalidRequest(f"input '{spec.name}': dim {axis} is {dim} = "
                                             f"{bound} from an earlier input, got "
                                             f"{array.shape[axis]}")
        if not self.batchable:
            return 1
        rows = {a.shape[0] for a in arrays}
        if len(rows) != 1:
            raise InvalidRequest(f"every input's dim 0 is the batch and must agree, got "
                                 f"{[a.shape[0] for a in arrays]}")
        (n,) = rows
        if not 1 <= n <= self.max_rows:
            raise InvalidRequest(f"expected 1..{self.max_rows} batch rows (dim 0), got {n}; "
                                 "split the request or serve with a larger --max-batch")
        return n

    @staticmethod
    def key_of(arrays: Sequence[np.ndarray]) -> tuple:
        """Requests with equal keys can share a batch: same dims past the batch dim."""
        return tuple(a.shape[1:] for a in arrays)

    def run_batch(self, requests: Sequence[Sequence[np.ndarray]]) -> BatchOutcome:
        """Run requests (of equal keys) as one padded batch; if that fails, run each alone so
        only the requests that fail by themselves get an error."""
        if not self.batchable:
            return BatchOutcome(tuple(_try(self.run, r) for r in requests), len(requests), 0,
                                False)
        rows = [r[0].shape[0] for r in requests]
        total = sum(rows)
        size = next((s for s in self.sizes if s >= total), total)
        try:
            outs = self.run(*(_stack([r[i] for r in requests], size)
                              for i in range(len(self.inputs))))
        except Exception:  # noqa: BLE001 - any failure: isolate the request that causes it
            return BatchOutcome(tuple(self._run_alone(r) for r in requests), total, 0, True)
        results: list[list[np.ndarray] | BaseException] = []
        start = 0
        for n in rows:
            results.append([out[start:start + n] for out in outs])
            start += n
        return BatchOutcome(tuple(results), total, size - total, False)

    def _run_alone(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray] | BaseException:
        n = arrays[0].shape[0]
        size = next(s for s in self.sizes if s >= n)
        result = _try(self.run, [_stack([a], size) for a in arrays])
        return result if isinstance(result, BaseException) else [o[:n] for o in result]

    def warmup_inputs(self) -> list[list[np.ndarray]]:
        """Zero inputs at every batch size the server runs (empty when some non-batch dim is
        symbolic: no shape to warm up at)."""
        if any(isinstance(d, str) and not (axis == 0 and self.batchable)
               for s in self.inputs for axis, d in enumerate(s.shape)):
            return []
        sizes = self.sizes or (None,)
        return [[np.zeros(tuple(size if (axis == 0 and size) else int(d)
                                for axis, d in enumerate(s.shape)), NUMPY_DTYPES[s.dtype])
                 for s in self.inputs] for size in sizes]


def _sizes(max_batch: int, batch_sizes: Sequence[int] | None) -> tuple[int, ...]:
    if batch_sizes:
        bad = [s for s in batch_sizes if not 1 <= s <= max_batch]
        if bad:
            raise ServingError(f"batch sizes must lie in 1..max_batch={max_batch}, got {bad}")
        return tuple(sorted(set(batch_sizes) | {max_batch}))
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def _stack(parts: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Concatenate along dim 0 and pad to `size` rows by repeating the last row (a valid input,
    unlike zeros for some models; padded rows' outputs are dropped)."""
    rows = sum(p.shape[0] for p in parts)
    if rows < size:
        parts = [*parts, np.repeat(parts[-1][-1:], size - rows, axis=0)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _try(run: RunFn, arrays: Sequence[np.ndarray]) -> list[np.ndarray] | BaseException:
    try:
        return list(run(*arrays))
    except Exception as exc:  # noqa: BLE001 - reported to that request's client
        return exc
