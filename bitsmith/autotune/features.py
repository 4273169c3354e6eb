"""Cost-model features of one (template, problem, config, device): a flat dict of named numbers.

Every knob is a feature (bools as 0/1, strings one-hot as `KNOB=value`); problem sizes are
features (`problem.M`, ...); for the register-tiled templates (`dense`, `conv2d_nhwc`) derived
quantities follow: flops, the tile's footprint against each cache level, its arithmetic
intensity, vector lanes used, parallel chunks per core, padding waste and loop trip counts; the
templates keyed by a signature get a size estimate. The device's descriptors are appended.
`FeatureSpace` fixes the column order of the matrix a model is trained on.
"""
from __future__ import annotations

import ast
import functools
import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..codegen.template import Config
from ..errors import TuningError

SYMBOLIC_SIZE = 8
"""The value every symbolic dimension (the batch `B`, ...) takes in size features."""

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow}
_CALLS: dict[str, Callable[..., Any]] = {
    "floor": math.floor, "ceiling": math.ceil, "Max": max, "Min": min, "Mod": operator.mod}


def _evaluate(node: ast.AST, text: str) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(SYMBOLIC_SIZE)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return float(_BINARY[type(node.op)](_evaluate(node.left, text),
                                            _evaluate(node.right, text)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, text)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _CALLS and not node.keywords):
        return float(_CALLS[node.func.id](*(_evaluate(a, text) for a in node.args)))
    raise TuningError(f"features: cannot read size '{text}': expected an integer or an "
                      f"expression over symbols such as '(16*B)'")


@functools.lru_cache(maxsize=4096)
def size_value(value: int | float | str) -> float:
    """A problem size as a number: ints as they are; '(16*B)' or 'B' with every symbol = 8."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise TuningError(f"features: cannot read size '{text}': not an expression") from None
    return _evaluate(tree, text)


def _dim_end(text: str, start: int) -> int:
    """The index after the dimension that starts at `start`, or -1 if none starts there."""
    if text.startswith("(", start):
        depth = 0
        for i in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                return i + 1
        return -1
    match = re.compile(r"\d+|[A-Z][A-Z0-9_]*").match(text, start)
    return match.end() if match else -1


def _close(text: str, start: int) -> int:
    """The index of the '>' that closes the '<' just before `start` (len(text) if none)."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"<": 1, ">": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text)


def tensor_types(text: str) -> list[tuple[tuple[float, ...], str]]:
    """(shape, dtype) of every `tensor<AxBx...xdtype>` in `text`, symbolic dims = 8."""
    out = []
    for match in re.finditer(r"tensor<", text):
        dims, pos = [], match.end()
        while True:
            end = _dim_end(text, pos)
            if end < 0 or not text.startswith("x", end):
                break
            dims.append(size_value(text[pos:end]))
            pos = end + 1
        out.append((tuple(dims), text[pos:_close(text, pos)]))
    return out


def _element_bytes(dtype: str) -> int:
    """Bytes per element of 'f32', 'bf16', 'f16', 'f64', 'i8' (4 when unreadable)."""
    bits = re.search(r"(\d+)$", dtype.strip())
    return max(1, int(bits.group(1)) // 8) if bits else 4


def knob_features(config: Mapping[str, Any]) -> dict[str, float]:
    """Knobs as numbers: bools 0/1, numbers as they are, strings one-hot `KNOB=value`."""
    out: dict[str, float] = {}
    for name, value in config.items():
        if isinstance(value, (bool, int, float)):
            out[name] = float(value)
        else:
            out[f"{name}={value}"] = 1.0
    return out


def _cache_bytes(descriptors: Mapping[str, float], level: str) -> float:
    log2 = float(descriptors.get(f"device.{level}_log2", 0.0))
    return 2.0 ** log2 if log2 > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TileShape:
    """A register-tiled contraction: `rows x cols` outputs, `depth` reduced, `mr x nr` tiles."""

    rows: float
    cols: float
    depth: float
    mr: int
    nr: int
    kc: float  # the reduction slice the tile walks before moving on (depth when unsplit)
    elem_bytes: int
    parallel: bool


def tile_features(tile: TileShape, descriptors: Mapping[str, float]) -> dict[str, float]:
    """Derived features of a register tile: flops, footprint vs caches, intensity, lanes, ..."""
    e, mr, nr, kc = tile.elem_bytes, tile.mr, tile.nr, tile.kc
    acc, panel, x_rows = mr * nr * e, kc * nr * e, mr * kc * e
    footprint = acc + panel + x_rows
    lanes = float(descriptors.get("device.lanes_f32", 4.0))
    tiles_m, tiles_n = math.ceil(tile.rows / mr), math.ceil(tile.cols / nr)
    cores = max(1.0, float(descriptors.get("device.cores", 1.0)))
    out = {
        "flops": 2.0 * tile.rows * tile.cols * tile.depth,
        "tile_acc_bytes": float(acc),
        "tile_panel_bytes": float(panel),
        "tile_x_bytes": float(x_rows),
        "tile_footprint_bytes": float(footprint),
        # flops of one pass over kc per byte the tile loads (x rows and the weight panel)
        "tile_intensity": 2.0 * mr * nr * kc / (panel + x_rows) if kc else 0.0,
        "vectors_per_row": nr / lanes,
        "last_vector_fill": (nr % lanes or lanes) / lanes,
        "acc_vectors": float(mr * math.ceil(nr / lanes)),
        "chunks_per_core": tiles_m * tiles_n / cores if tile.parallel else 0.0,
        "padding_waste": (tiles_n * nr - tile.cols) / tile.cols if tile.cols else 0.0,
        "trips_m": float(tiles_m),
        "trips_n": float(tiles_n),
        "trips_k": float(tile.depth),
        "trips_kc": float(math.ceil(tile.depth / kc)) if kc else 0.0,
    }
    for level in ("l1d", "l2", "l3"):
        size = _cache_bytes(descriptors, level)
        out[f"footprint_{level}"] = footprint / size if size else 0.0
    return out


def _dense(params: Mapping[str, Any], config: Config,
           descriptors: Mapping[str, float]) -> dict[str, float]:
    m, n, k = size_value(params["M"]), size_value(params["N"]), size_value(params["K"])
    split = int(config.get("TILE_K", 0))
    tile = TileShape(rows=m, cols=n, depth=k, mr=int(config["TILE_M"]),
                     nr=int(config["TILE_N"]), kc=min(split, k) if split else k,
                     elem_bytes=_element_bytes(str(params.get("dtype", "f32"))),
                     parallel=bool(config.get("PARALLEL", False)))
    epilogue = str(params.get("epilogue", ""))
    out = {"problem.M": m, "problem.N": n, "problem.K": k,
           "problem.elem_bytes": float(tile.elem_bytes),
           "problem.epilogue_ops": float(len(epilogue.split(",")) if epilogue else 0),
           **tile_features(tile, descriptors)}
    # work items (one panel x a block of row tiles, or every row) are the parallel grain
    tiles_m, tiles_n = math.ceil(m / tile.mr), math.ceil(n / tile.nr)
    block = int(config.get("ROW_BLOCK", 0))
    items = tiles_n * (math.ceil(tiles_m / block) if block else 1)
    cores = max(1.0, float(descriptors.get("device.cores", 1.0)))
    out["chunks_per_core"] = items / cores if tile.parallel else 0.0
    out["row_padding_waste"] = (tiles_m * tile.mr - m) / m if m else 0.0
    out["item_rows"] = float(min(block * tile.mr, tiles_m * tile.mr) if block else
                             tiles_m * tile.mr)
    return out


def _ints(text: Any, count: int) -> list[int]:
    values = [int(v) for v in re.findall(r"\d+", str(text))] or [1]
    return (values * count)[:count] if len(values) < count else values[:count]


def _conv2d_nhwc(params: Mapping[str, Any], config: Config,
                 descriptors: Mapping[str, float]) -> dict[str, float]:
    x_types, w_types = tensor_types(str(params["x"])), tensor_types(str(params["w"]))
    if not x_types or len(x_types[0][0]) != 4 or not w_types or len(w_types[0][0]) != 4:
        raise TuningError(f"features: conv2d_nhwc expects 4-d x and w types, got "
                          f"x={params['x']!r}, w={params['w']!r}")
    batch, height, _, _ = x_types[0][0]
    (kh, kw, cin, _), w_dtype = w_types[0]
    (sh, _), (ph, _) = _ints(params.get("stride"), 2), _ints(params.get("padding", 0), 2)
    dh = _ints(params.get("dilation"), 2)[0]
    oh = max(1.0, (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1)
    ow, oc = size_value(params["OW"]), size_value(params["OC"])
    tile = TileShape(rows=batch * oh * ow, cols=oc, depth=kh * kw * cin,
                     mr=int(config["TILE_W"]), nr=int(config["TILE_C"]), kc=kh * kw * cin,
                     elem_bytes=_element_bytes(w_dtype),
                     parallel=bool(config.get("PARALLEL", False)))
    out = {"problem.batch": batch, "problem.OH": oh, "problem.OW": ow, "problem.OC": oc,
           "problem.reduction": kh * kw * cin, "problem.stride": float(sh),
           **tile_features(tile, descriptors)}
    out["trips_m"] = float(math.ceil(ow / tile.mr))  # the tile runs along one output row
    out["trips_rows"] = batch * oh
    return out


def _signature(params: Mapping[str, Any], config: Config,
               descriptors: Mapping[str, float]) -> dict[str, float]:
    signature = str(params.get("signature", ""))
    sizes = [math.prod(shape) for shape, _ in tensor_types(signature)]
    return {"problem.elements": float(max(sizes, default=0.0)),
            "problem.ops": float(len(signature.split(";")) if signature else 0)}


def _generic(params: Mapping[str, Any], config: Config,
             descriptors: Mapping[str, float]) -> dict[str, float]:
    out = {f"problem.{k}": float(v) for k, v in params.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out | (_signature(params, config, descriptors) if "signature" in params else {})


def _attention(params: Mapping[str, Any], config: Config,
               descriptors: Mapping[str, float]) -> dict[str, float]:
    rows = float(params.get("rows", 0) or SYMBOLIC_SIZE)
    chunks = float(config.get("ROW_CHUNKS", 1))
    return _signature(params, config, descriptors) | {"problem.rows": rows,
                                                      "rows_per_chunk": rows / chunks}


_BY_TEMPLATE = {"dense": _dense, "conv_gemm": _dense,  # an implicit GEMM: M, N, K and tiles
                "conv2d_nhwc": _conv2d_nhwc, "attention": _attention,
                "elementwise": _signature, "rows": _signature}


def features(template_name: str, problem_params: Mapping[str, Any], config: Config,
             descriptors: Mapping[str, float]) -> dict[str, float]:
    """Named numeric features of (problem, config, device); symbolic sizes ('(16*B)') use B=8."""
    derive = _BY_TEMPLATE.get(template_name, _generic)
    try:
        derived = derive(problem_params, config, descriptors)
    except KeyError as exc:
        raise TuningError(f"features: template {template_name} problem or config lacks {exc}; "
                          f"params {sorted(problem_params)}, knobs {sorted(config)}") from None
    return knob_features(config) | derived | {k: float(v) for k, v in descriptors.items()}


@dataclass(frozen=True, slots=True)
class FeatureSpace:
    """The columns of a model's feature matrix, in a fixed (sorted) order."""

    columns: tuple[str, ...]

    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, float]]) -> FeatureSpace:
        """The space of every feature name that occurs in `rows`."""
        return cls(tuple(sorted({name for row in rows for name in row})))

    def matrix(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """rows x columns float32 matrix: missing features are 0, unknown names ignored."""
        out = np.zeros((len(rows), len(self.columns)), dtype=np.float32)
        index = {name: j for j, name in enumerate(self.columns)}
        for i, row in enumerate(rows):
            for name, value in row.items():
                j = index.get(name)
                if j is not None:
                    out[i, j] = value
        return out

    def to_json(self) -> str:
        """The columns as JSON."""
        return json.dumps({"columns": list(self.columns)})

    @classmethod
    def from_json(cls, text: str) -> FeatureSpace:
        """The space `to_json` wrote; TuningError when the text is not one."""
        try:
            columns = json.loads(text)["columns"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TuningError(f"feature space: expected JSON {{'columns': [...]}}, got "
                              f"{text[:80]!r} ({exc})") from None
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise TuningError(f"feature space: columns must be a list of names, got {columns!r}")
        return cls(tuple(columns))
