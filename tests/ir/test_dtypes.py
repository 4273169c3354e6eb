"""Tests of bitsmith.ir.dtypes against independent oracles (ml_dtypes, exact python arithmetic)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir import dtypes as dt
from bitsmith.ir.dtypes import (
    BoolType,
    DTypeError,
    FloatType,
    IntType,
    LowFloatType,
    bf16,
    boolean,
    f16,
    f32,
    from_numpy_dtype,
    int_type,
    low_float,
    parse_dtype,
    promote,
)

SETTINGS = settings(derandomize=True, database=None, max_examples=300, deadline=None)

# Every valid low-bit float layout (E, M): 3 <= 1+E+M <= 8, E >= 1, M >= 0.
LAYOUTS = [(e, b - 1 - e) for b in range(3, 9) for e in range(1, b)]
FINITE_ONLY = [lm for lm in LAYOUTS if lm not in ((4, 3), (5, 2))]
ML_FORMATS = [
    ((2, 1), ml_dtypes.float4_e2m1fn),
    ((3, 2), ml_dtypes.float6_e3m2fn),
    ((2, 3), ml_dtypes.float6_e2m3fn),
    ((4, 3), ml_dtypes.float8_e4m3fn),
    ((5, 2), ml_dtypes.float8_e5m2),
]


# ---- independent oracles --------------------------------------------------------------------

def oracle_decode(code: int, e_bits: int, m_bits: int) -> float:
    """Value of a low-bit float code from the closed formula, one code at a time."""
    bits = 1 + e_bits + m_bits
    sign = code >> (bits - 1)
    e, m = (code >> m_bits) & ((1 << e_bits) - 1), code & ((1 << m_bits) - 1)
    bias = 2 ** (e_bits - 1) - 1
    if (e_bits, m_bits) == (5, 2) and e == 31:
        v = math.inf if m == 0 else math.nan
    elif (e_bits, m_bits) == (4, 3) and e == 15 and m == 7:
        v = math.nan
    elif e == 0:
        v = math.ldexp(m, 1 - bias - m_bits)
    else:
        v = math.ldexp((1 << m_bits) + m, e - bias - m_bits)
    return -v if sign else v


def oracle_finite(e_bits: int, m_bits: int) -> list[float]:
    """Finite non-negative values, ascending; index == code."""
    vals = [oracle_decode(c, e_bits, m_bits) for c in range(1 << (e_bits + m_bits))]
    return [v for v in vals if math.isfinite(v)]


def oracle_round(x: int | float, p: int, emin: int, top: float, overflow: float) -> float:
    """x rounded to p significant bits (exponent >= emin), ties to even, in exact arithmetic;
    magnitudes above `top` become `overflow` (inf, or top itself to saturate)."""
    sign = -1.0 if math.copysign(1.0, x) < 0 else 1.0
    if math.isinf(x):
        return sign * overflow
    a = abs(Fraction(x))
    if a == 0:
        return sign * 0.0
    k = a.numerator.bit_length() - a.denominator.bit_length()
    k = k - 1 if Fraction(2) ** k > a else k  # now 2**k <= a < 2**(k+1)
    quantum = Fraction(2) ** (max(k, emin) - (p - 1))
    r = round(a / quantum) * quantum  # round() on a Fraction is half-to-even
    return sign * (overflow if r > Fraction(top) else float(r))


def low_float_oracle(x: int | float, e_bits: int, m_bits: int) -> float:
    """x encoded into layout (E, M) with satfinite, as a float value."""
    top = oracle_finite(e_bits, m_bits)[-1]
    return oracle_round(x, m_bits + 1, 2 - 2 ** (e_bits - 1), top, top)


def wrap(v: int, width: int, signed: bool) -> int:
    """v modulo 2**width into the signed or unsigned range."""
    v %= 1 << width
    return v - (1 << width) if signed and v >= 1 << (width - 1) else v


def assert_same_floats(got: np.ndarray, want: np.ndarray) -> None:
    """Equal as floats, NaN where NaN, and zeros with the same sign."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])
    np.testing.assert_array_equal(np.signbit(got[ok]), np.signbit(want[ok]))


# ---- low-bit floats: decoding ---------------------------------------------------------------

@pytest.mark.parametrize(("layout", "ml_type"), ML_FORMATS, ids=lambda v: str(v))
def test_decode_every_code_matches_ml_dtypes(layout, ml_type):
    t = low_float(*layout)
    codes = np.arange(1 << t.bits, dtype=np.uint8)
    got = t.from_bits(codes)
    assert got.dtype == np.float32
    assert_same_floats(got, codes.view(ml_type).astype(np.float32))


# All 27 layouts, so also those ml_dtypes lacks (f3e1m1, f5e2m2, f5e3m1, f7e3m3, f8e3m4, ...).
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_decode_every_code_matches_closed_formula(layout):
    t = low_float(*layout)
    codes = np.arange(1 << t.bits)
    assert_same_floats(t.from_bits(codes), [oracle_decode(int(c), *layout) for c in codes])


@pytest.mark.parametrize(("t", "top", "tiny", "eps", "has_nan"), [
    (dt.f4e2m1, 6.0, 0.5, 0.5, False), (dt.f6e3m2, 28.0, 0.0625, 0.25, False),
    (dt.f6e2m3, 7.5, 0.125, 0.125, False), (dt.f8e4m3, 448.0, 2.0**-9, 0.125, True),
    (dt.f8e5m2, 57344.0, 2.0**-16, 0.25, True), (low_float(2, 0), 4.0, 1.0, 1.0, False),
    (low_float(1, 1), 3.0, 1.0, 1.0, False),
], ids=str)
def test_low_float_facts(t, top, tiny, eps, has_nan):
    assert (t.max_value, t.min_value, t.smallest_subnormal, t.eps) == (top, -top, tiny, eps)
    assert t.has_nan is has_nan and t.is_float and t.is_signed and not t.is_int
    assert t.numpy_dtype == np.float32


# ---- low-bit floats: encoding ---------------------------------------------------------------

def _tie_code(i: int, m_bits: int) -> int:
    """Code a tie between codes i and i+1 rounds to (the even multiple of the spacing)."""
    if m_bits:
        return i if i % 2 == 0 else i + 1
    return i if i == 0 else i + 1


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("np_float", [np.float64, np.float32])
def test_midpoints_round_to_even_and_neighbours_to_nearest(layout, np_float):
    t = low_float(*layout)
    vals = oracle_finite(*layout)
    lo, hi = np.array(vals[:-1], np_float), np.array(vals[1:], np_float)
    mid = (lo + hi) / 2  # exact: few significant bits
    idx = np.arange(len(vals) - 1)
    cases = [
        (mid, [_tie_code(i, layout[1]) for i in idx]),
        (np.nextafter(mid, np_float(np.inf)), idx + 1),
        (np.nextafter(mid, np_float(-np.inf)), idx),
    ]
    sign = 1 << (t.bits - 1)
    for x, want in cases:
        np.testing.assert_array_equal(t.to_bits(t.cast(x)), want)
        np.testing.assert_array_equal(t.to_bits(t.cast(-x)), np.asarray(want) | sign)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_every_value_encodes_to_its_own_code(layout):
    t = low_float(*layout)
    codes = np.arange(1 << t.bits)
    values = t.from_bits(codes)
    ok = ~np.isnan(values)
    np.testing.assert_array_equal(t.to_bits(values[ok]), codes[ok])
    assert_same_floats(t.cast(values[np.isfinite(values)]), values[np.isfinite(values)])


@pytest.mark.parametrize(("layout", "ml_type"), ML_FORMATS, ids=lambda v: str(v))
def test_encode_matches_ml_dtypes_in_range(layout, ml_type):
    t = low_float(*layout)
    rng = np.random.default_rng(1234)
    vals = np.array(oracle_finite(*layout))
    mids = (vals[:-1] + vals[1:]) / 2
    x = np.concatenate([
        rng.uniform(-t.max_value, t.max_value, 200_000),
        rng.normal(0, 1, 50_000) * vals[1] * 4,  # the subnormal range
        mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), vals, -vals, [-0.0],
    ]).astype(np.float32)
    x = x[np.abs(x) <= t.max_value]
    want = x.astype(ml_type).view(np.uint8)
    np.testing.assert_array_equal(t.to_bits(t.cast(x)), want)


@pytest.mark.parametrize(("layout", "ml_type"), ML_FORMATS, ids=lambda v: str(v))
@SETTINGS
@given(x=st.floats(width=32, allow_nan=False))
def test_encode_float32_matches_ml_dtypes_or_saturates(layout, ml_type, x):
    t = low_float(*layout)
    got = t.cast(np.float32(x))
    if abs(x) > t.max_value:
        assert got == math.copysign(t.max_value, x)
    else:
        assert_same_floats(got, np.float32(x).astype(ml_type).astype(np.float32))


@SETTINGS
@given(layout=st.sampled_from(LAYOUTS), x=st.floats(allow_nan=False))
def test_encode_float64_matches_exact_rounding(layout, x):
    assert_same_floats(low_float(*layout).cast(x), low_float_oracle(x, *layout))


@SETTINGS
@given(layout=st.sampled_from(LAYOUTS), x=st.integers(-(2**63), 2**63 - 1))
def test_encode_int64_matches_exact_rounding(layout, x):
    assert_same_floats(low_float(*layout).cast(np.int64(x)), low_float_oracle(x, *layout))


@pytest.mark.parametrize(("t", "x", "want"), [
    (dt.f4e2m1, [5.0, 5.01, 6.5, 7.0, 100.0, np.inf, -7.0, -np.inf], [4, 6, 6, 6, 6, 6, -6, -6]),
    (dt.f8e4m3, [464.0, 470.0, 479.9, 480.0, 1e30, np.inf, -np.inf], [448] * 6 + [-448]),
    (dt.f8e5m2, [61440.0, 65536.0, 1e9, np.inf, -np.inf], [57344] * 4 + [-57344]),
    (dt.f6e3m2, [30.0, 32.0, 1e6, -np.inf], [28, 28, 28, -28]),
    (dt.f6e2m3, [7.75, 8.0, 1e6], [7.5, 7.5, 7.5]),
], ids=str)
def test_saturates_above_max_finite(t, x, want):
    np.testing.assert_array_equal(t.cast(np.array(x)), np.array(want, np.float32))


def test_nan_encodings():
    for t, code in ((dt.f8e4m3, 0x7F), (dt.f8e5m2, 0x7E)):
        assert np.isnan(t.cast(np.nan))
        np.testing.assert_array_equal(t.to_bits([np.nan, -np.nan]), [code, code | 0x80])
    np.testing.assert_array_equal(dt.f8e5m2.to_bits([np.inf, -np.inf]), [0x7C, 0xFC])
    assert dt.f8e5m2.cast(np.inf) == 57344.0 and np.isinf(dt.f8e5m2.from_bits(0x7C))


@pytest.mark.parametrize("layout", FINITE_ONLY, ids=str)
def test_finite_only_formats_refuse_nan(layout):
    t = low_float(*layout)
    with pytest.raises(ValueError, match=f"^{t.name} has no NaN encoding$"):
        t.cast(np.array([1.0, np.nan]))
    with pytest.raises(DTypeError, match="has no NaN encoding"):
        t.to_bits(np.float32(np.nan))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_negative_zero_keeps_its_sign(layout):
    t = low_float(*layout)
    sign = 1 << (t.bits - 1)
    assert t.to_bits(-0.0) == sign and t.to_bits(0.0) == 0
    tiny = t.smallest_subnormal / 4
    assert np.signbit(t.cast(-tiny)) and t.cast(-tiny) == 0 and t.to_bits(t.cast(-tiny)) == sign


def test_to_bits_refuses_unrepresentable_values():
    with pytest.raises(ValueError, match=r"f4e2m1.to_bits: value 0.3 is not representable"):
        dt.f4e2m1.to_bits([1.0, 0.3])
    with pytest.raises(ValueError, match="f8e4m3.to_bits: value inf is not representable"):
        dt.f8e4m3.to_bits(np.inf)


def test_from_bits_refuses_bad_codes():
    with pytest.raises(ValueError, match=r"f4e2m1 codes must be in 0\.\.15, got 16"):
        dt.f4e2m1.from_bits([3, 16])
    with pytest.raises(ValueError, match=r"i3 codes must be in 0\.\.7, got -1"):
        dt.i3.from_bits(np.array([-1]))
    with pytest.raises(ValueError, match="from_bits expects an integer array of codes, got dtype"):
        dt.f8e4m3.from_bits(np.array([1.0]))


def test_low_float_cast_takes_ints_and_keeps_shape():
    got = dt.f4e2m1.cast(np.array([[3, 5], [7, -100]], np.int64))
    np.testing.assert_array_equal(got, np.array([[3, 4], [6, -6]], np.float32))
    assert got.dtype == np.float32 and dt.f4e2m1.cast(1.25).shape == ()


def test_million_values_round_trip():
    rng = np.random.default_rng(7)
    x = rng.normal(0, 100, 1_000_000).astype(np.float32)
    y = dt.f8e4m3.cast(x)
    assert_same_floats(dt.f8e4m3.from_bits(dt.f8e4m3.to_bits(y)), y)
    want = x.clip(-448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert_same_floats(y, want)


# ---- standard floats ------------------------------------------------------------------------

STD = [(f32, 24, -126), (f16, 11, -14), (bf16, 8, -126)]


def _std_oracle(t: FloatType, p: int, emin: int, x: int | float) -> float:
    return oracle_round(x, p, emin, t.max_value, math.inf)


@pytest.mark.parametrize(("t", "p", "emin"), STD, ids=lambda v: str(v))
@SETTINGS
@given(x=st.floats(allow_nan=False))
def test_std_float_cast_from_float64_rounds_once(t, p, emin, x):
    got = t.cast(np.float64(x))
    assert got.dtype == t.numpy_dtype
    assert_same_floats(got, _std_oracle(t, p, emin, x))


@pytest.mark.parametrize(("t", "p", "emin"), STD, ids=lambda v: str(v))
@SETTINGS
@given(x=st.integers(-(2**63), 2**63 - 1) | st.integers(2**63, 2**64 - 1))
def test_std_float_cast_from_int64_rounds_once(t, p, emin, x):
    arr = np.array([x], np.int64 if x < 2**63 else np.uint64)
    assert_same_floats(t.cast(arr), [_std_oracle(t, p, emin, x)])


def test_no_double_rounding():
    # float64 -> float32 -> bf16 would land on a tie and round down; one rounding goes up.
    assert bf16.cast(1 + 2.0**-8 + 2.0**-40) == 1 + 2.0**-7
    # int64 -> float64 -> float32 would do the same.
    assert f32.cast(np.int64(2**62 + 2**38 + 1)) == 2.0**62 + 2.0**39
    assert bf16.cast(np.int64(2**62 + 2**54 + 1)) == 2.0**62 + 2.0**55


def test_std_float_facts_and_bits():
    assert (f32.bits, f16.bits, bf16.bits) == (32, 16, 16)
    assert (f16.max_value, f16.min_value, f16.eps) == (65504.0, -65504.0, 2.0**-10)
    assert bf16.numpy_dtype == ml_dtypes.bfloat16 and bf16.smallest_subnormal == 2.0**-133
    assert f32.to_bits(1.0) == 0x3F800000 and f16.to_bits(1.0) == 0x3C00
    np.testing.assert_array_equal(bf16.to_bits([1.0, -0.0, -np.inf]), [0x3F80, 0x8000, 0xFF80])
    assert f16.cast(65519.0) == 65504 and np.isinf(f16.cast(65520.0))
    with pytest.raises(ValueError, match="f32.to_bits: value 0.1 is not representable in f32"):
        f32.to_bits(0.1)


@pytest.mark.parametrize("t", [f32, f16, bf16], ids=str)
def test_std_float_bits_round_trip(t):
    codes = np.arange(1 << 16, dtype=np.uint32)  # every f16/bf16 pattern; f32: top halves
    codes = codes << np.uint32(16) | np.uint32(0x1235) if t.bits == 32 else codes
    values = t.from_bits(codes)
    assert values.dtype == t.numpy_dtype
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        ok = ~np.isnan(values)
    np.testing.assert_array_equal(t.to_bits(values[ok]), codes[ok])
    assert t.to_bits(values[ok]).dtype == np.dtype(f"uint{t.bits}")


# ---- integers -------------------------------------------------------------------------------

@pytest.mark.parametrize(("t", "lo", "hi", "np_dtype"), [
    (dt.i1, -1, 0, np.int8), (dt.u1, 0, 1, np.uint8), (dt.i3, -4, 3, np.int8),
    (dt.u5, 0, 31, np.uint8), (dt.i6, -32, 31, np.int8), (int_type(9), -256, 255, np.int16),
    (int_type(17, False), 0, 2**17 - 1, np.uint32), (int_type(33), -(2**32), 2**32 - 1, np.int64),
    (dt.i64, -(2**63), 2**63 - 1, np.int64), (dt.u64, 0, 2**64 - 1, np.uint64),
], ids=str)
def test_int_ranges(t, lo, hi, np_dtype):
    assert (t.min_value, t.max_value, t.numpy_dtype) == (lo, hi, np.dtype(np_dtype))
    assert t.is_int and not t.is_float and t.is_signed == (lo < 0)


def test_int_cast_truncates_then_wraps():
    np.testing.assert_array_equal(dt.i3.cast([4, 5, -5, 7, 8]), [-4, -3, 3, -1, 0])
    np.testing.assert_array_equal(dt.i8.cast([127.9, -128.9, 128.0, 255.5, -3.7]),
                                  [127, -128, -128, -1, -3])
    np.testing.assert_array_equal(dt.i1.cast([1, 2, 3, -1]), [-1, 0, -1, -1])
    np.testing.assert_array_equal(dt.u5.cast([33, -1, 31.9]), [1, 31, 31])
    assert dt.u64.cast(np.int64(-1)) == 2**64 - 1 and dt.i64.cast(2.0**63) == -(2**63)
    assert dt.u64.cast(2.0**64 + 2.0**12) == 2**12 and dt.u8.cast(True) == 1


def test_int_cast_refuses_nan_and_inf():
    with pytest.raises(ValueError, match="cannot cast nan to i8: NaN and inf have no integer"):
        dt.i8.cast([1.0, np.nan])
    with pytest.raises(ValueError, match="cannot cast -inf to u5"):
        dt.u5.cast(-np.inf)


@SETTINGS
@given(width=st.integers(1, 64), signed=st.booleans(), x=st.integers(-(2**63), 2**63 - 1))
def test_int_cast_of_int64_wraps_like_python(width, signed, x):
    t = int_type(width, signed)
    got = t.cast(np.array([x], np.int64))
    assert got.dtype == t.numpy_dtype and int(got[0]) == wrap(x, width, signed)


@SETTINGS
@given(width=st.integers(1, 64), signed=st.booleans(), x=st.integers(0, 2**64 - 1))
def test_int_cast_of_uint64_wraps_like_python(width, signed, x):
    got = int_type(width, signed).cast(np.array([x], np.uint64))
    assert int(got[0]) == wrap(x, width, signed)


@SETTINGS
@given(width=st.integers(1, 64), signed=st.booleans(),
       x=st.floats(allow_nan=False, allow_infinity=False))
def test_int_cast_of_float_truncates_then_wraps(width, signed, x):
    assert int(int_type(width, signed).cast(x)) == wrap(math.trunc(x), width, signed)


@SETTINGS
@given(data=st.data())
def test_int_bits_round_trip_every_width(data):
    width, signed = data.draw(st.integers(1, 64)), data.draw(st.booleans())
    t = int_type(width, signed)
    v = data.draw(st.integers(t.min_value, t.max_value))
    arr = np.array([v], t.numpy_dtype)
    code = t.to_bits(arr)
    assert code.dtype.kind == "u" and code.dtype.itemsize == t.numpy_dtype.itemsize
    assert int(code[0]) == v % (1 << width)
    back = t.from_bits(code)
    assert back.dtype == t.numpy_dtype and int(back[0]) == v
    assert int(t.from_bits(t.to_bits(t.cast(arr)))[0]) == v


def test_int_to_bits_refuses_out_of_range():
    for t, bad in ((dt.i3, 4), (dt.i3, -5), (dt.u5, -1), (dt.u5, 32), (dt.i1, 1), (dt.i8, 1.5)):
        with pytest.raises(ValueError, match=f"{t.name}.to_bits: value {bad} is not representable"):
            t.to_bits(np.array([0, bad]))
    np.testing.assert_array_equal(dt.i3.to_bits([-1, -4, 3]), [7, 4, 3])
    assert dt.u64.to_bits(np.uint64(2**64 - 1)) == 2**64 - 1


# ---- bool -----------------------------------------------------------------------------------

def test_bool():
    assert (boolean.bits, boolean.name, boolean.numpy_dtype) == (1, "bool", np.dtype(np.bool_))
    assert not (boolean.is_float or boolean.is_int or boolean.is_signed)
    np.testing.assert_array_equal(boolean.cast([0, 2, -0.0, np.nan, 0.5]),
                                  [False, True, False, True, True])
    np.testing.assert_array_equal(boolean.to_bits([True, False]), np.array([1, 0], np.uint8))
    np.testing.assert_array_equal(boolean.from_bits([1, 0]), [True, False])
    with pytest.raises(ValueError, match="bool.to_bits: value 2 is not representable"):
        boolean.to_bits([2])


# ---- names, construction, numpy mapping, promotion ------------------------------------------

ALL_NAMES = (["f32", "f16", "bf16", "bool"] + [f"{p}{w}" for p in "iu" for w in range(1, 65)]
             + [f"f{1 + e + m}e{e}m{m}" for e, m in LAYOUTS])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_parse_round_trips_every_name(name):
    t = parse_dtype(name)
    assert t.name == str(t) == name and parse_dtype(str(t)) == t
    assert hash(t) == hash(parse_dtype(name))


def test_named_constants():
    assert (dt.i8, dt.u8, dt.i64, dt.f8e4m3) == (IntType(8), IntType(8, False), int_type(64),
                                                 LowFloatType(4, 3))
    assert boolean == BoolType() and f32 == FloatType("f32") and dt.i8 != dt.u8
    assert repr(dt.i3) == "IntType(width=3, signed=True)"


BAD_NAMES = ["", "i0", "i65", "u0", "i08", "I8", " f32", "f32 ", "f64", "float32", "f9e4m4",
             "f8e4m4", "f2e1m0", "f8e0m7", "f3e1m1x", "f4e2m01", "boolean", "q4"]


@pytest.mark.parametrize("text", BAD_NAMES)
def test_parse_refuses_bad_names(text):
    expected = ("expected f32, f16, bf16, bool, iN/uN (N in 1..64) or fBeEmM "
                "(3 <= B <= 8, B = 1+E+M)")
    with pytest.raises(ValueError, match=re.escape(f"unknown dtype {text!r}: {expected}")):
        parse_dtype(text)


def test_parse_refuses_non_text():
    with pytest.raises(ValueError, match="dtype text must be a str, got int"):
        parse_dtype(8)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: IntType(0), "integer width must be 1..64, got 0"),
    (lambda: IntType(65, False), "integer width must be 1..64, got 65"),
    (lambda: int_type(True), "integer width must be 1..64, got True"),
    (lambda: IntType(8, 1), "integer signedness must be a bool, got 1"),
    (lambda: low_float(0, 3), "low-bit float needs exp_bits >= 1 and man_bits >= 0, got e0m3"),
    (lambda: low_float(2, -1), "low-bit float needs exp_bits >= 1 and man_bits >= 0, got e2m-1"),
    (lambda: low_float(4, 4), r"low-bit float width 1\+E\+M must be 3..8, got 1\+4\+4 = 9"),
    (lambda: low_float(1, 0), r"low-bit float width 1\+E\+M must be 3..8, got 1\+1\+0 = 2"),
    (lambda: low_float(2.0, 1), "low-bit float exp_bits and man_bits must be ints, got 2.0, 1"),
    (lambda: FloatType("f64"), "float kind must be one of f32, f16, bf16, got 'f64'"),
])
def test_constructors_validate(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(("np_dtype", "want"), [
    (np.float32, f32), (np.float16, f16), (ml_dtypes.bfloat16, bf16), (np.bool_, boolean),
    (np.int8, dt.i8), (np.int16, dt.i16), (np.int32, dt.i32), (np.int64, dt.i64),
    (np.uint8, dt.u8), (np.uint16, dt.u16), (np.uint32, dt.u32), (np.uint64, dt.u64),
], ids=str)
def test_from_numpy_dtype(np_dtype, want):
    assert from_numpy_dtype(np.dtype(np_dtype)) == want == from_numpy_dtype(np_dtype)
    assert want.numpy_dtype == np.dtype(np_dtype)


@pytest.mark.parametrize("bad", [np.float64, np.complex64, ml_dtypes.float8_e4m3fn, "U3"])
def test_from_numpy_dtype_refuses_others(bad):
    with pytest.raises(ValueError, match=r"no dtype for numpy .*: expected float32, float16"):
        from_numpy_dtype(bad)


@pytest.mark.parametrize(("a", "b", "want"), [
    (dt.i8, dt.i8, dt.i8), (boolean, dt.u8, dt.u8), (dt.i3, boolean, dt.i3),
    (dt.i8, dt.i32, dt.i32), (dt.u8, dt.u16, dt.u16), (dt.i3, dt.i6, dt.i6),
    (dt.u8, dt.i8, dt.i16), (dt.u8, dt.i16, dt.i16), (dt.i32, dt.u32, dt.i64),
    (dt.u5, dt.i3, dt.i8), (dt.u3, dt.i6, dt.i6), (dt.i64, dt.u32, dt.i64),
    (dt.i64, f16, f16), (dt.u8, bf16, bf16), (boolean, f32, f32), (dt.i4, dt.f4e2m1, dt.f4e2m1),
    (f16, bf16, f32), (bf16, f16, f32), (f16, f32, f32), (bf16, bf16, bf16),
    (dt.f8e4m3, f16, f16), (bf16, dt.f4e2m1, bf16), (dt.f8e4m3, dt.f8e5m2, f32),
    (dt.f4e2m1, dt.f4e2m1, dt.f4e2m1),
], ids=str)
def test_promote(a, b, want):
    assert promote(a, b) == want and promote(b, a) == want


def test_promote_refuses_u64_with_signed():
    with pytest.raises(ValueError, match="cannot promote u64 with i8: no integer type holds both"):
        promote(dt.u64, dt.i8)


def test_cast_refuses_non_numeric_input():
    with pytest.raises(ValueError, match=r"expected a real numeric array .* got dtype <U1"):
        f32.cast(np.array(["a"]))
    with pytest.raises(ValueError, match="got dtype complex128"):
        dt.i8.cast(np.array([1j]))
