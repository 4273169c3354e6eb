"""Element types of the IR: f32/f16/bf16, bool, any-width ints iN/uN and low-bit floats fBeEmM.

Each dtype names the numpy dtype the reference interpreter holds its values in (`numpy_dtype`),
converts arrays into its value domain (`cast`) and maps values to and from bit codes (`to_bits`,
which refuses values the type cannot hold exactly, and its inverse `from_bits`).

Casts:
- To a float: round to nearest, ties to even, once, from the exact input value (int64 inputs go
  to float64 by round-to-odd, so no double rounding). f32/f16/bf16 overflow to +-inf (IEEE).
- To an int: truncate toward zero, then wrap modulo 2**bits into range (what torch and C casts
  do in practice). NaN and +-inf have no integer value: `DTypeError`.
- To bool: `x != 0`.

`convert` is what graph.cast means: torch's `Tensor.to(dtype)` on x86 CPU, measured with torch
2.13 (`torch.tensor([nan, inf, -inf, 3e9, -3e9, 1e20, 2.7, -2.7]).to(dtype)`, scalar and
vectorised paths alike). It differs from `cast` in two places:
- Float to int goes through a signed int of 32 or 64 bits as x86's cvttss2si/cvttsd2si do:
  truncate toward zero in range; NaN, +-inf and values outside the range give the 'integer
  indefinite' value, that int's minimum. The result then keeps the low bits (wraps). torch's
  int64 goes through int64 (NaN -> -2**63), int32/int16/int8 through int32 (int16/int8 of NaN
  or 3e9: the low bits of -2**31, 0), uint8 through int64 (c10's cast to uint8 via int64; -2.7
  -> 254), uint16 through int32. Here: iN (N <= 32) and uN (9 <= N <= 31) through int32, the
  other widths through int64 (u32/u64 in range match torch's uint32/uint64; their NaN and
  negative values do not; the importer never makes them).
- Int to f16/bf16 rounds twice, int -> f32 -> f16/bf16, as torch's c10::Half/BFloat16 take a
  float (int32 1077936129 -> bf16 is 1073741824, not the nearest 1082130432).
Bool is `x != 0` (NaN -> True); float to float and int to f32 round once, to nearest even, as
`cast`. On an NVIDIA GPU torch's own float -> int of NaN/inf/out-of-range values is CUDA's
conversion, not x86's (unchecked here: no GPU); bitsmith's kernels give the x86 values above on
every device, so in-range values agree everywhere and the rest match torch on CPU.

Low-bit floats `f{B}e{E}m{M}` (B = 1+E+M, 3 <= B <= 8, E >= 1, M >= 0): sign bit on top, then E
exponent bits with bias 2**(E-1)-1, then M mantissa bits; exponent field 0 holds zero and the
subnormals m * 2**(1-bias-M). Values are held as float32, where every one of them is exact.
- f8e5m2 is IEEE-754 style: exponent all-ones is inf (mantissa 0) or NaN; max finite 57344.
- f8e4m3 is OCP E4M3FN: no infinities, only S.1111.111 is NaN; max finite 448.
- Every other layout is finite-only (OCP MX FP6/FP4 style): every code is a number (f4e2m1 max
  6.0, f6e3m2 max 28.0, f6e2m3 max 7.5).
- Encoding rounds to nearest, ties to even: to the value that is an even multiple of the spacing
  there (the even mantissa; with M = 0 the larger power of two, as ml_dtypes' E8M0). Magnitudes
  above the largest finite value, +-inf included, saturate to +-max ("satfinite", as weight
  quantization wants). NaN maps to the NaN code where there is one, else raises `DTypeError`.
  -0.0 keeps its sign bit.

`promote` follows torch: bool < ints < floats. Ints of one signedness give the wider; iS with uU
gives iS if S > U, else the smallest of i8/i16/i32/i64 wider than U (u64 with a signed int:
error). int + float gives the float; two different standard floats give f32 (f16 + bf16 -> f32);
a low-bit float with a standard float gives the standard float; two low-bit floats give f32.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

from ..errors import DTypeError

_EXPECTED = "expected f32, f16, bf16, bool, iN/uN (N in 1..64) or fBeEmM (3 <= B <= 8, B = 1+E+M)"


def _container_uint(bits: int) -> np.dtype:
    """Smallest of uint8/16/32/64 with at least `bits` bits."""
    return np.dtype(f"uint{max(8, 1 << (bits - 1).bit_length())}")


def _int_to_float64(a: np.ndarray) -> np.ndarray:
    """Integers to float64, rounding to odd so one later rounding to <= 51 bits stays exact."""
    if a.dtype.itemsize <= 4:
        return a.astype(np.float64)
    u = a.astype(np.int64 if a.dtype.kind == "i" else np.uint64).view(np.uint64)
    neg = a < 0
    mag = np.where(neg, np.negative(u), u)  # ufunc: wraps silently, even on scalars
    hi = (mag >> np.uint64(32)).astype(np.float64) * 2.0**32
    lo = (mag & np.uint64(0xFFFFFFFF)).astype(np.float64)
    s = hi + lo
    # TwoSum: err is exactly (hi + lo) - s, so we know which side the rounding went.
    bb = s - hi
    err = (hi - (s - bb)) + (lo - bb)
    even = (s.view(np.uint64) & np.uint64(1)) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return np.where(neg, -s, s)


def _as_float64(arr: object) -> np.ndarray:
    """Any numeric array as float64: exact for float inputs, round-to-odd for wide ints."""
    a = np.asarray(arr)
    kind = a.dtype.kind
    if kind in "iu":
        return _int_to_float64(a)
    if kind in "bf" or (kind == "V" and a.dtype.type.__module__ == "ml_dtypes"):
        return a.astype(np.float64)
    raise DTypeError(f"expected a real numeric array (bool, int or float), got dtype {a.dtype}")


def _wrap64(arr: object, who: str) -> np.ndarray:
    """Values truncated toward zero, as int64 holding value mod 2**64 in two's complement."""
    a = np.asarray(arr)
    if a.dtype.kind in "bi":
        return a.astype(np.int64)
    if a.dtype.kind == "u":
        return a.astype(np.uint64).view(np.int64)
    f = _as_float64(a)
    if not np.isfinite(f).all():
        bad = f[~np.isfinite(f)].flat[0]
        raise DTypeError(f"cannot cast {bad} to {who}: NaN and inf have no integer value")
    # fmod is exact in IEEE arithmetic, and both corrections below stay exactly representable.
    r = np.fmod(np.trunc(f), 2.0**64)
    r = np.where(r >= 2.0**63, r - 2.0**64, r)
    r = np.where(r < -(2.0**63), r + 2.0**64, r)
    return r.astype(np.int64)


def _codes_u64(codes: object, bits: int, who: str) -> np.ndarray:
    """Validated bit codes (integers in 0..2**bits-1) as uint64."""
    c = np.asarray(codes)
    if c.dtype.kind not in "biu":
        raise DTypeError(f"{who}.from_bits expects an integer array of codes, got dtype {c.dtype}")
    u = c.astype(np.uint64)
    bad = (c < 0) | (u > np.uint64((1 << bits) - 1))
    if bad.any():
        raise DTypeError(f"{who} codes must be in 0..{(1 << bits) - 1}, got {c[bad].flat[0]}")
    return u


def _first_bad(a: object, ok: np.ndarray, who: str) -> None:
    """Raise for the first value of `a` whose `ok` is False."""
    if not ok.all():
        got = np.asarray(a)[~ok].flat[0]
        raise DTypeError(f"{who}.to_bits: value {got} is not representable in {who}; "
                         "cast() it first")


@dataclass(frozen=True, slots=True)
class DType(ABC):
    """An element type: immutable, hashable, equal by its defining fields; str() is its name."""

    # Derived facts, filled in by each subclass's __post_init__ (through `_settle`); not part of
    # __init__, repr or comparison. The field() options are spelled out on each line because
    # type checkers only read them from a literal field(...) call.
    # canonical text, the form parse_dtype reads
    name: str = field(init=False, repr=False, compare=False)
    # bit width of one element (1 for bool)
    bits: int = field(init=False, repr=False, compare=False)
    # f32/f16/bf16 and the low-bit floats
    is_float: bool = field(init=False, repr=False, compare=False)
    # iN/uN, not bool
    is_int: bool = field(init=False, repr=False, compare=False)
    # floats and iN
    is_signed: bool = field(init=False, repr=False, compare=False)
    # the range; for floats +-largest finite
    min_value: int | float = field(init=False, repr=False, compare=False)
    max_value: int | float = field(init=False, repr=False, compare=False)
    # what the reference interpreter holds values in
    numpy_dtype: np.dtype = field(init=False, repr=False, compare=False)

    def _settle(self, name: str, bits: int, kind: str, signed: bool, lo: int | float,
                hi: int | float, np_dtype: np.dtype) -> None:
        """Fill in the derived facts (kind is "float", "int" or "bool")."""
        facts = {"name": name, "bits": bits, "is_float": kind == "float", "is_int": kind == "int",
                 "is_signed": signed, "min_value": lo, "max_value": hi, "numpy_dtype": np_dtype}
        for attr, value in facts.items():
            object.__setattr__(self, attr, value)  # the dataclass is frozen

    @abstractmethod
    def cast(self, arr: object) -> np.ndarray:
        """Convert any real numeric array into this type's value domain (as `numpy_dtype`)."""

    @abstractmethod
    def to_bits(self, arr: object) -> np.ndarray:
        """Bit code of each value, as the smallest unsigned numpy int holding `bits` bits."""

    @abstractmethod
    def from_bits(self, codes: object) -> np.ndarray:
        """Values of the given bit codes, as `numpy_dtype`; the inverse of `to_bits`."""

    def __str__(self) -> str:
        return self.name


_STD_FLOATS = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16),
               "bf16": np.dtype(ml_dtypes.bfloat16)}


def _f64_to_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 in one rounding (ml_dtypes rounds through float32 twice)."""
    with np.errstate(over="ignore"):
        r = x.astype(np.float32)
    # Round to odd into float32 (24 bits), then the float32 -> bf16 (8 bits) rounding is exact.
    inexact = (r != x) & ~np.isnan(x)
    even = (r.view(np.uint32) & np.uint32(1)) == 0
    toward = np.where(x > r, np.float32(np.inf), np.float32(-np.inf))
    r = np.where(inexact & even, np.nextafter(r, toward), r)
    return r.astype(ml_dtypes.bfloat16)


@dataclass(frozen=True, slots=True)
class FloatType(DType):
    """A standard IEEE float: f32, f16 or bf16."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in _STD_FLOATS:
            raise DTypeError(f"float kind must be one of f32, f16, bf16, got {self.kind!r}")
        np_dtype = _STD_FLOATS[self.kind]
        top = float(ml_dtypes.finfo(np_dtype).max)
        self._settle(self.kind, np_dtype.itemsize * 8, "float", True, -top, top, np_dtype)

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value."""
        return float(ml_dtypes.finfo(self.numpy_dtype).smallest_subnormal)

    @property
    def eps(self) -> float:
        """Gap between 1.0 and the next larger value."""
        return float(ml_dtypes.finfo(self.numpy_dtype).eps)

    def cast(self, arr: object) -> np.ndarray:
        """Round to nearest even (overflow gives +-inf)."""
        x = _as_float64(arr)
        if self.kind == "bf16":
            return np.asarray(_f64_to_bf16(x))
        with np.errstate(over="ignore"):
            return np.asarray(x.astype(self.numpy_dtype))

    def to_bits(self, arr: object) -> np.ndarray:
        """IEEE bit patterns (uint32 for f32, uint16 for f16/bf16)."""
        x = _as_float64(arr)
        v = self.cast(x)
        _first_bad(arr, (v == x) | np.isnan(x), self.name)
        return np.asarray(v.view(_container_uint(self.bits)))

    def from_bits(self, codes: object) -> np.ndarray:
        """Floats with the given IEEE bit patterns."""
        u = _codes_u64(codes, self.bits, self.name)
        return np.asarray(u.astype(_container_uint(self.bits)).view(self.numpy_dtype))


@dataclass(frozen=True, slots=True)
class IntType(DType):
    """A two's complement (signed) or plain binary (unsigned) integer of 1..64 bits."""

    width: int
    signed: bool = True

    def __post_init__(self) -> None:
        w = self.width
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 64:
            raise DTypeError(f"integer width must be 1..64, got {w!r}")
        if not isinstance(self.signed, bool):
            raise DTypeError(f"integer signedness must be a bool, got {self.signed!r}")
        s = self.signed
        lo, hi = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if s else (0, (1 << w) - 1)
        np_dtype = np.dtype(_container_uint(w).name[1 if s else 0:])  # "uint8" -> "int8"
        self._settle(f"{'i' if s else 'u'}{w}", w, "int", s, lo, hi, np_dtype)

    def _from_u64(self, u: np.ndarray) -> np.ndarray:
        """Values whose low `width` bits are `u`, as `numpy_dtype`."""
        shift = 64 - self.width
        top = np.asarray(u, np.uint64) << np.uint64(shift)
        # Shifting back down sign-extends (int64) or zero-extends (uint64) the low bits.
        v = top.view(np.int64) >> np.int64(shift) if self.signed else top >> np.uint64(shift)
        return np.asarray(v.astype(self.numpy_dtype))

    def cast(self, arr: object) -> np.ndarray:
        """Truncate toward zero, then wrap modulo 2**width into range."""
        return self._from_u64(_wrap64(arr, self.name).view(np.uint64))

    def _in_range(self, arr: object) -> np.ndarray:
        """Which values are integers within min_value..max_value."""
        a = np.asarray(arr)
        lo, hi = self.min_value, self.max_value
        if a.dtype.kind in "bi":
            a64 = a.astype(np.int64)
            return (a64 >= lo) & (a64 <= min(hi, 2**63 - 1))
        if a.dtype.kind == "u":
            return a.astype(np.uint64) <= np.uint64(hi)
        f = _as_float64(a)
        # lo and hi + 1 are 0 or powers of two, so these float comparisons are exact.
        return np.isfinite(f) & (np.trunc(f) == f) & (f >= float(lo)) & (f < float(hi + 1))

    def to_bits(self, arr: object) -> np.ndarray:
        """Low `width` bits of each value's two's complement."""
        _first_bad(arr, self._in_range(arr), self.name)
        u = _wrap64(arr, self.name).view(np.uint64)
        if self.width < 64:
            u = u & np.uint64((1 << self.width) - 1)
        return np.asarray(u.astype(_container_uint(self.width)))

    def from_bits(self, codes: object) -> np.ndarray:
        """Sign-extend (iN) or zero-extend (uN) the codes."""
        return self._from_u64(_codes_u64(codes, self.width, self.name))


@dataclass(frozen=True, slots=True, eq=False)
class _LowFloatTables:
    """Lookup tables of one low-bit float layout."""

    decode: np.ndarray  # float32 value of every code
    finite: np.ndarray  # float64 magnitudes of the finite non-negative codes; index == code
    nan_code: int | None
    inf_code: int | None


@functools.cache
def _low_float_tables(exp_bits: int, man_bits: int) -> _LowFloatTables:
    """Build the tables of layout (exp_bits, man_bits) from the closed formula."""
    bits, bias = 1 + exp_bits + man_bits, (1 << (exp_bits - 1)) - 1
    codes = np.arange(1 << (bits - 1))
    e, m = codes >> man_bits, codes & ((1 << man_bits) - 1)
    mag = np.where(e == 0, np.ldexp(m.astype(np.float64), 1 - bias - man_bits),
                   np.ldexp((m + (1 << man_bits)).astype(np.float64), e - bias - man_bits))
    nan_code = inf_code = None
    if (exp_bits, man_bits) == (5, 2):
        top = e == (1 << exp_bits) - 1
        mag[top] = np.where(m[top] == 0, np.inf, np.nan)
        inf_code, nan_code = int(codes[top][0]), int(codes[top][2])  # 0x7C, 0x7E like ml_dtypes
    elif (exp_bits, man_bits) == (4, 3):
        mag[-1] = np.nan
        nan_code = int(codes[-1])
    finite = mag[np.isfinite(mag)]
    return _LowFloatTables(np.concatenate([mag, -mag]).astype(np.float32), finite,
                           nan_code, inf_code)


@dataclass(frozen=True, slots=True)
class LowFloatType(DType):
    """A low-bit float fBeEmM with B = 1+E+M in 3..8 (semantics in the module docstring)."""

    exp_bits: int
    man_bits: int

    def __post_init__(self) -> None:
        e, m = self.exp_bits, self.man_bits
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (e, m)):
            raise DTypeError(f"low-bit float exp_bits and man_bits must be ints, got {e!r}, {m!r}")
        if e < 1 or m < 0:
            raise DTypeError(f"low-bit float needs exp_bits >= 1 and man_bits >= 0, got e{e}m{m}")
        if not 3 <= 1 + e + m <= 8:
            raise DTypeError(f"low-bit float width 1+E+M must be 3..8, got 1+{e}+{m} = {1 + e + m}")
        top = float(_low_float_tables(e, m).finite[-1])
        # float32 holds every value of every layout exactly.
        self._settle(f"f{1 + e + m}e{e}m{m}", 1 + e + m, "float", True, -top, top,
                     np.dtype(np.float32))

    @property
    def has_nan(self) -> bool:
        """Whether a NaN code exists (f8e5m2, f8e4m3)."""
        return self._tables.nan_code is not None

    @property
    def _tables(self) -> _LowFloatTables:
        return _low_float_tables(self.exp_bits, self.man_bits)

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value (a normal one when M = 0)."""
        return float(self._tables.finite[1])

    @property
    def eps(self) -> float:
        """Gap between 1.0 and the next larger value."""
        finite = self._tables.finite
        return float(finite[np.searchsorted(finite, 1.0, side="right")] - 1.0)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """float64 -> codes: round to nearest even code, saturate, NaN to the NaN code."""
        t = self._tables
        mag = np.abs(x)
        hi = np.clip(np.searchsorted(t.finite, mag), 1, len(t.finite) - 1)
        lo = hi - 1
        # Table values have <= 7 significant bits, so the midpoint is exact in float64.
        mid = (t.finite[lo] + t.finite[hi]) * 0.5
        # Ties go to the even multiple of the spacing: the even code when M >= 1; when M = 0
        # the larger power of two (2 = 2 * 1), except that 0 beats the smallest value.
        lo_odd = lo % 2 == 1 if self.man_bits else lo > 0
        code = np.where((mag > mid) | ((mag == mid) & lo_odd), hi, lo)
        nan = np.isnan(x)
        if nan.any():
            if t.nan_code is None:
                raise DTypeError(f"{self.name} has no NaN encoding")
            code = np.where(nan, t.nan_code, code)
        code = code | (np.signbit(x).astype(code.dtype) << (self.bits - 1))
        return np.asarray(code.astype(np.uint8))

    def cast(self, arr: object) -> np.ndarray:
        """Round to nearest even with saturation, as float32."""
        return np.asarray(self._tables.decode[self._encode(_as_float64(arr))])

    def to_bits(self, arr: object) -> np.ndarray:
        """The format's code of each value (inf allowed only in f8e5m2)."""
        x = _as_float64(arr)
        code = self._encode(x)
        t = self._tables
        if t.inf_code is not None:
            code = np.where(np.isinf(x), (code & 0x80) | t.inf_code, code).astype(np.uint8)
        _first_bad(arr, (t.decode[code] == x) | np.isnan(x), self.name)
        return np.asarray(code)

    def from_bits(self, codes: object) -> np.ndarray:
        """float32 values of the codes."""
        return np.asarray(self._tables.decode[_codes_u64(codes, self.bits, self.name)])


@dataclass(frozen=True, slots=True)
class BoolType(DType):
    """Boolean: one bit, held as numpy bool_."""

    def __post_init__(self) -> None:
        self._settle("bool", 1, "bool", False, 0, 1, np.dtype(np.bool_))

    def cast(self, arr: object) -> np.ndarray:
        """x != 0 (NaN is True, as in torch)."""
        return np.asarray(_as_float64(arr) != 0)

    def to_bits(self, arr: object) -> np.ndarray:
        """0 or 1 as uint8."""
        x = _as_float64(arr)
        _first_bad(arr, (x == 0) | (x == 1), self.name)
        return np.asarray(x.astype(np.uint8))

    def from_bits(self, codes: object) -> np.ndarray:
        """Codes 0/1 as bool."""
        return np.asarray(_codes_u64(codes, 1, self.name) != 0)


def int_type(width: int, signed: bool = True) -> IntType:
    """The iN (or uN) type of the given width."""
    return IntType(width, signed)


def low_float(exp_bits: int, man_bits: int) -> LowFloatType:
    """The low-bit float with E exponent and M mantissa bits."""
    return LowFloatType(exp_bits, man_bits)


f32, f16, bf16 = FloatType("f32"), FloatType("f16"), FloatType("bf16")
boolean = BoolType()
i1, i2, i3, i4, i5, i6, i7 = (IntType(w, True) for w in range(1, 8))
i8, i16, i32, i64 = (IntType(w, True) for w in (8, 16, 32, 64))
u1, u2, u3, u4, u5, u6, u7 = (IntType(w, False) for w in range(1, 8))
u8, u16, u32, u64 = (IntType(w, False) for w in (8, 16, 32, 64))
f4e2m1, f6e2m3, f6e3m2 = LowFloatType(2, 1), LowFloatType(2, 3), LowFloatType(3, 2)
f8e4m3, f8e5m2 = LowFloatType(4, 3), LowFloatType(5, 2)



def torch_int_via(dtype: IntType) -> int:
    """Width (32 or 64) of the signed int a float goes through on its way to `dtype` in
    `convert`, as torch's casts on x86 (module docstring)."""
    if dtype.width > 32 or not dtype.signed and dtype.width in (1, 2, 3, 4, 5, 6, 7, 8, 32):
        return 64
    return 32


def convert(arr: object, dtype: DType) -> np.ndarray:
    """`arr` converted to `dtype` as torch converts on x86 CPU: graph.cast's meaning (module
    docstring)."""
    a = np.asarray(arr)
    floating = a.dtype.kind == "f" or (a.dtype.kind == "V" and a.dtype.type.__module__ ==
                                        "ml_dtypes")
    if isinstance(dtype, IntType) and floating:
        top = 2.0 ** (torch_int_via(dtype) - 1)
        f = _as_float64(a)
        ok = (f >= -top) & (f < top)  # False for NaN
        return dtype.cast(np.where(ok, np.trunc(np.where(ok, f, 0.0)), -top).astype(np.int64))
    if isinstance(dtype, FloatType) and dtype.kind != "f32" and a.dtype.kind in "iu":
        a = f32.cast(a)
    return dtype.cast(a)


_INT_RE = re.compile(r"([iu])([1-9][0-9]*)")
_LOW_RE = re.compile(r"f([1-9][0-9]*)e([1-9][0-9]*)m(0|[1-9][0-9]*)")


def parse_dtype(text: str) -> DType:
    """The dtype whose `name` is `text`."""
    if not isinstance(text, str):
        raise DTypeError(f"dtype text must be a str, got {type(text).__name__}")
    if text in _STD_FLOATS:
        return FloatType(text)
    if text == "bool":
        return boolean
    if (m := _INT_RE.fullmatch(text)) and 1 <= int(m[2]) <= 64:
        return IntType(int(m[2]), m[1] == "i")
    if m := _LOW_RE.fullmatch(text):
        b, e, man = int(m[1]), int(m[2]), int(m[3])
        if b == 1 + e + man and 3 <= b <= 8:
            return LowFloatType(e, man)
    raise DTypeError(f"unknown dtype {text!r}: {_EXPECTED}")


_FROM_NUMPY: dict[np.dtype, DType] = {np.dtype(t.numpy_dtype): t
                                      for t in (f32, f16, bf16, boolean)}
_FROM_NUMPY.update({np.dtype(f"{p}int{w}"): IntType(w, p == "")
                    for p in ("", "u") for w in (8, 16, 32, 64)})


def from_numpy_dtype(dtype: DTypeLike) -> DType:
    """The dtype for a numpy float32/float16/bfloat16/int8..int64/uint8..uint64/bool dtype."""
    try:
        key = np.dtype(dtype)
    except TypeError as err:
        raise DTypeError(f"not a numpy dtype: {dtype!r}") from err
    if key not in _FROM_NUMPY:
        raise DTypeError(f"no dtype for numpy {key}: expected float32, float16, bfloat16, "
                         "int8..int64, uint8..uint64 or bool")
    return _FROM_NUMPY[key]


def promote(a: DType, b: DType) -> DType:
    """The type both operands convert to, torch style (rules in the module docstring)."""
    if a == b or isinstance(b, BoolType):
        return a
    if isinstance(a, BoolType):
        return b
    if a.is_float != b.is_float:
        return a if a.is_float else b
    if a.is_float:
        if isinstance(a, LowFloatType) != isinstance(b, LowFloatType):
            return b if isinstance(a, LowFloatType) else a
        return f32
    if not (isinstance(a, IntType) and isinstance(b, IntType)):
        raise DTypeError(f"cannot promote {a} with {b}: unknown dtype kinds")
    if a.signed == b.signed:
        return a if a.width >= b.width else b
    s, u = (a, b) if a.signed else (b, a)
    if s.width > u.width:
        return s
    if u.width >= 64:
        raise DTypeError(f"cannot promote {a} with {b}: no integer type holds both; "
                         "cast one operand first")
    return IntType(next(w for w in (8, 16, 32, 64) if w > u.width), True)
