"""The KServe v2 (Open Inference Protocol) JSON codec: requests in, numpy arrays out, and back.

Every check a request can fail is made here, before the request is queued, and fails with
`InvalidRequest`: its message says what was expected and what came, and its `status` is the
HTTP status to answer with. Nothing here knows about HTTP servers or the batcher.

Requests may be hostile: orjson (>= 3.9.15) refuses JSON nested deeper than 1024 levels, and
nothing here recurses into a request's values without a bound (error messages describe them
with `_brief`, a few levels and characters deep, and echo names cut to `NAME_CHARS`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy
import numpy as np
import orjson

from ..errors import InvalidRequest
from ..runtime.artifact import NUMPY_DTYPES, TensorSpec

DATATYPES = {"bool": "BOOL", "u8": "UINT8", "u16": "UINT16", "u32": "UINT32", "u64": "UINT64",
             "i8": "INT8", "i16": "INT16", "i32": "INT32", "i64": "INT64", "f16": "FP16",
             "f32": "FP32", "f64": "FP64", "bf16": "BF16"}
"""IR element type -> KServe v2 datatype name."""
NUMPY_OF_DATATYPE = {**{DATATYPES[k]: v for k, v in NUMPY_DTYPES.items() if k in DATATYPES},
                     "FP64": "float64"}
"""KServe v2 datatype -> numpy dtype name ("bfloat16" is known to numpy once ml_dtypes is
imported)."""
MAX_DIM = 2**31 - 1
"""The largest dim a request may give (and every variable dim past the first must be >= 1)."""
NAME_CHARS = 64
"""The most characters of a name from a request that an error message repeats."""
_FLOAT_CHARS = {2: 16, 4: 16, 8: 24}
"""The widest JSON number orjson writes for a float of each size (f16 and bf16 go out as f32):
-1.0000001e-38 and -2.2250738585072014e-308."""


@dataclass(frozen=True, slots=True)
class Signature:
    """What a served model takes and returns, as the server presents it: dims that may vary
    (symbolic in the artifact, or the batch dim the server pads) are None."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variable: tuple[tuple[bool, ...], ...]  # per input, per dim: any size accepted
    output_variable: tuple[tuple[bool, ...], ...]

    def metadata(self, name: str, platform: str = "bitsmith") -> dict[str, Any]:
        """The KServe v2 model metadata document (`-1` for a dim that may vary)."""
        def tensors(specs: Sequence[TensorSpec], variable: Sequence[Sequence[bool]]) -> list:
            return [{"name": s.name, "datatype": DATATYPES.get(s.dtype, s.dtype.upper()),
                     "shape": [-1 if v else d for d, v in zip(s.shape, var, strict=True)]}
                    for s, var in zip(specs, variable, strict=True)]
        return {"name": name, "versions": ["1"], "platform": platform,
                "inputs": tensors(self.inputs, self.variable),
                "outputs": tensors(self.outputs, self.output_variable)}

    def shape_text(self, index: int) -> str:
        """An input's shape as the metadata shows it, e.g. [-1, 16]."""
        spec, var = self.inputs[index], self.variable[index]
        return str([-1 if v else d for d, v in zip(spec.shape, var, strict=True)])


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded request: its id, the input arrays in the model's input order, and the names
    of the outputs to return (all of them unless the request asked for some)."""

    id: str | None
    arrays: tuple[np.ndarray, ...]
    outputs: tuple[int, ...]


def decode_request(body: bytes, signature: Signature) -> InferRequest:
    """Parse and check a KServe v2 infer request body against `signature`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest(f"expected a JSON object with 'inputs', got {type(doc).__name__}")
    tensors = doc.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise InvalidRequest("expected 'inputs': a non-empty list of tensors, got "
                             f"{_brief(tensors)}")
    by_name: dict[str, Mapping[str, Any]] = {}
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidRequest(f"every input needs a string 'name', got {_brief(tensor)}")
        if tensor["name"] in by_name:
            raise InvalidRequest(f"input '{_cut(tensor['name'])}' is given twice")
        by_name[tensor["name"]] = tensor
    names = [s.name for s in signature.inputs]
    unknown = sorted(set(by_name) - set(names))
    missing = [n for n in names if n not in by_name]
    if unknown or missing:
        raise InvalidRequest(f"expected inputs {', '.join(names)}, got {_names(by_name)}"
                             + (f" (unknown: {_names(unknown)})" if unknown else "")
                             + (f" (missing: {', '.join(missing)})" if missing else ""))
    _check_parameters(doc, "the request")
    most = (len(body) + 1) // 2  # each value takes a character and a separator
    arrays = tuple(_decode_tensor(by_name[s.name], i, signature, most)
                   for i, s in enumerate(signature.inputs))
    return InferRequest(_request_id(doc), arrays, _requested_outputs(doc, signature))


def _check_parameters(doc: Mapping[str, Any], where: str) -> None:
    """KServe v2 `parameters`, where given, are a JSON object (their keys are not used here)."""
    params = doc.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest(f"{where}: 'parameters' must be a JSON object, got {_brief(params)}")


def _request_id(doc: Mapping[str, Any]) -> str | None:
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidRequest(f"'id' must be a string, got {_brief(rid)}")
    return rid


def _requested_outputs(doc: Mapping[str, Any], signature: Signature) -> tuple[int, ...]:
    wanted = doc.get("outputs")
    names = [s.name for s in signature.outputs]
    if wanted is None:
        return tuple(range(len(names)))
    if not isinstance(wanted, list) or not all(
            isinstance(w, dict) and isinstance(w.get("name"), str) for w in wanted):
        raise InvalidRequest(f"'outputs' must be a list of {{\"name\": ...}}, got "
                             f"{_brief(wanted)}")
    picked: list[int] = []
    for w in wanted:
        if w["name"] not in names:
            raise InvalidRequest(f"output '{_cut(w['name'])}' is not an output of this model; "
                                 f"expected one of {', '.join(names)}")
        if names.index(w["name"]) in picked:  # each would be answered again: a response bomb
            raise InvalidRequest(f"output '{w['name']}' is asked for twice in 'outputs'; name "
                                 "each output once")
        _check_parameters(w, f"output '{w['name']}'")
        picked.append(names.index(w["name"]))
    return tuple(picked)


def _decode_tensor(tensor: Mapping[str, Any], index: int, signature: Signature,
                   most: int) -> np.ndarray:
    """The input `index` as an array; `most`: the most values its body could carry."""
    spec = signature.inputs[index]
    _check_parameters(tensor, f"input '{spec.name}'")
    want_type = DATATYPES[spec.dtype]
    got_type = tensor.get("datatype")
    if got_type != want_type:
        raise InvalidRequest(f"input '{spec.name}': expected datatype {want_type}, got "
                             f"{_brief(got_type)}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRequest(f"input '{spec.name}': 'shape' must be a list of ints >= 0, got "
                             f"{_brief(shape)}")
    expected = signature.shape_text(index)
    if len(shape) != len(spec.shape):
        raise InvalidRequest(f"input '{spec.name}': expected shape {expected} (rank "
                             f"{len(spec.shape)}), got {_brief(shape)}")
    for axis, (dim, got, variable) in enumerate(zip(spec.shape, shape,
                                                     signature.variable[index], strict=True)):
        if not variable and dim != got:
            raise InvalidRequest(f"input '{spec.name}': expected shape {expected}, got {shape} "
                                 f"(dim {axis} must be {dim})")
        # before numpy, which raises on huge dims (a batch of 0 rows is the model's to refuse)
        if got > MAX_DIM or (variable and got == 0 and axis > 0):
            raise InvalidRequest(f"input '{spec.name}': expected shape {expected} with every "
                                 f"dim from 1 to {MAX_DIM}, got {shape} (dim {axis} is {got})")
    count = math.prod(max(d, 1) for d in shape)  # a fixed dim of 0 holds no value
    if count > most:
        raise InvalidRequest(f"input '{spec.name}': expected a shape of at most {most} values "
                             f"(all this request's body can carry), got {shape} ({count} "
                             "values, counting a 0 dim as 1); send a shape that matches 'data'")
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InvalidRequest(f"input '{spec.name}': 'data' must be a JSON list (binary tensor "
                             f"data is not supported), got {_brief(data)}")
    return _to_array(spec.name, data, shape, want_type)


def _to_array(name: str, data: list, shape: list[int], datatype: str) -> np.ndarray:
    """Values in row-major order (flat, or nested along the shape) as an array of `datatype`,
    refusing what a cast would change: floats for ints, out-of-range ints, non-bools."""
    try:
        raw = np.asarray(data)
    except (ValueError, OverflowError, TypeError):
        raise InvalidRequest(f"input '{name}': 'data' is a ragged nested list or holds values "
                             "that are not numbers") from None
    count = math.prod(shape)
    if raw.size != count:
        raise InvalidRequest(f"input '{name}': shape {shape} holds {count} values, got "
                             f"{raw.size}")
    dtype = np.dtype(NUMPY_OF_DATATYPE[datatype])
    kind = raw.dtype.kind if raw.size else dtype.kind
    if datatype == "BOOL":
        ok = kind == "b"
    elif dtype.kind in "iu":
        ok = kind in "iu" and (raw.size == 0 or (
            int(raw.min()) >= np.iinfo(dtype).min and int(raw.max()) <= np.iinfo(dtype).max))
    else:
        ok = kind in "iuf"
    if not ok:
        sample = _brief(raw.ravel()[:1].tolist() if raw.size else [])  # may be a deep object
        what = "in range" if dtype.kind in "iu" and kind in "iu" else f"of kind {raw.dtype}"
        raise InvalidRequest(f"input '{name}': expected {datatype} values, got values {what} "
                             f"(first: {sample})")
    return raw.astype(dtype, copy=False).reshape(shape)


def encode_response(model: str, request_id: str | None, specs: Sequence[TensorSpec],
                    arrays: Sequence[np.ndarray]) -> bytes:
    """The KServe v2 infer response body, tensor data flat in row-major order."""
    outputs = [{"name": s.name, "datatype": DATATYPES.get(s.dtype, s.dtype.upper()),
                "shape": list(a.shape), "data": _jsonable(a)}
               for s, a in zip(specs, arrays, strict=True)]
    doc: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def response_bytes_bound(model: str, request_id: str | None, specs: Sequence[TensorSpec],
                         arrays: Sequence[np.ndarray]) -> int:
    """The most bytes `encode_response` can write for these outputs (every number at its
    dtype's widest JSON text), known without encoding them."""
    size = 100 + 6 * (len(model) + len(request_id or ""))  # 6: a control character's \u escape
    for spec, array in zip(specs, arrays, strict=True):
        size += 100 + 6 * len(spec.name) + 21 * array.ndim + array.size * (_json_chars(array) + 1)
    return size


def _json_chars(array: np.ndarray) -> int:
    """The widest JSON text of one element of `array` (null for NaN and inf)."""
    dtype = array.dtype
    if dtype.kind == "b":
        return len("false")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return max(len(str(info.min)), len(str(info.max)))
    return _FLOAT_CHARS.get(dtype.itemsize, 32)


def _jsonable(array: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.name in ("bfloat16", "float16"):  # orjson writes neither; f32 holds both
        return flat.astype(np.float32)
    return flat


def decode_response(body: bytes) -> dict[str, np.ndarray]:
    """A KServe v2 infer response as arrays by output name (for clients and tests)."""
    doc = orjson.loads(body)
    out = {}
    for tensor in doc["outputs"]:
        dtype = NUMPY_OF_DATATYPE.get(tensor["datatype"], "float32")
        out[tensor["name"]] = np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    return out


def encode_request(names: Sequence[str], arrays: Sequence[np.ndarray],
                   request_id: str | None = None) -> bytes:
    """A KServe v2 infer request body for `arrays` (for clients and tests)."""
    inputs = [{"name": n, "shape": list(a.shape), "datatype": _datatype_of(a),
               "data": _jsonable(a)} for n, a in zip(names, arrays, strict=True)]
    doc: dict[str, Any] = {"inputs": inputs}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _datatype_of(array: np.ndarray) -> str:
    for datatype, numpy_name in NUMPY_OF_DATATYPE.items():
        if array.dtype.name == numpy_name:
            return datatype
    raise InvalidRequest(f"arrays of dtype {array.dtype} have no KServe v2 datatype")


def _brief(value: Any, limit: int = 60) -> str:
    """A JSON value as an error message shows it: at most `limit` characters, and built from
    its first few items a few levels deep (a value nested 1024 deep, which `repr` would
    refuse with a RecursionError, costs no more than a flat one)."""
    text = _sketch(value, depth=3)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _sketch(value: Any, depth: int) -> str:
    """Python-like text of `value`, `depth` levels and four items per level at most."""
    if isinstance(value, (list, dict)):
        if not value:
            return repr(value)
        if depth == 0:
            return "[...]" if isinstance(value, list) else "{...}"
        if isinstance(value, list):
            items = [_sketch(v, depth - 1) for v in value[:4]]
        else:
            items = [f"{_sketch(k, 0)}: {_sketch(v, depth - 1)}"
                     for k, v in itertools.islice(value.items(), 4)]
        more = ", ..." if len(value) > 4 else ""
        opening, closing = ("[", "]") if isinstance(value, list) else ("{", "}")
        return opening + ", ".join(items) + more + closing
    if isinstance(value, str):
        return repr(_cut(value))
    return _cut(repr(value))  # numbers, bools, None, and numpy's objects


def _cut(name: str) -> str:
    """`name` cut to NAME_CHARS characters for an error message."""
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "..."


def _names(names: Sequence[str] | Mapping[str, Any]) -> str:
    """The first few names, cut, for an error message (a request may send thousands)."""
    listed = [_cut(n) for n in itertools.islice(names, 8)]
    return ", ".join(listed) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
