"""Dense bit packing: exact round trips for every width 1..8, both layouts, and the errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir.packing import (
    lane_blocks,
    pack_lanes,
    pack_rows,
    row_words,
    unpack_lanes,
    unpack_rows,
)


@st.composite
def codes(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(st.integers(1, 8))
    rows, length = draw(st.integers(1, 4)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31))
    return np.random.default_rng(seed).integers(0, 1 << bits, (rows, length),
                                                dtype=np.uint8), bits


@settings(max_examples=150, deadline=None)
@given(codes())
def test_rows_round_trip_is_exact_and_dense(case: tuple[np.ndarray, int]) -> None:
    c, bits = case
    words = pack_rows(c, bits)
    assert words.dtype == np.uint32
    assert words.shape == (c.shape[0], -(-c.shape[1] * bits // 32))  # no padding per code
    np.testing.assert_array_equal(unpack_rows(words, bits, c.shape[1]), c)


@settings(max_examples=100, deadline=None)
@given(codes(), st.sampled_from([4, 8, 16]))
def test_lanes_round_trip_is_exact(case: tuple[np.ndarray, int], lanes: int) -> None:
    c, bits = case
    words = pack_lanes(c, bits, lanes)
    assert words.shape == (c.shape[0], lane_blocks(c.shape[1], lanes), bits, lanes)
    np.testing.assert_array_equal(unpack_lanes(words, bits, c.shape[1]), c)


def test_rows_layout_is_a_little_endian_bit_stream() -> None:
    # 3-bit codes 1, 2, 3 -> bits 001 010 011 from the bottom; code 10 straddles words 0 and 1
    words = pack_rows(np.array([[1, 2, 3]], np.uint8), 3)
    assert words.tolist() == [[1 | 2 << 3 | 3 << 6]]
    c = np.zeros((1, 11), np.uint8)
    c[0, 10] = 0b101  # bits 30..32: low two bits in word 0, the top bit in word 1
    words = pack_rows(c, 3)
    assert words.tolist() == [[0b01 << 30, 0b1]]
    assert row_words(11, 3) == 2


def test_lanes_layout_puts_position_i_of_lane_l_at_code_i_times_lanes_plus_l() -> None:
    lanes, bits = 4, 5
    c = np.zeros((1, 32 * lanes), np.uint8)
    c[0, 3 * lanes + 2] = 0b10110  # position 3 of lane 2: bits 15..19 of lane 2's stream
    words = pack_lanes(c, bits, lanes)
    assert words[0, 0, 0, 2] == 0b10110 << 15 and words.sum() == 0b10110 << 15


@pytest.mark.parametrize("bad, bits, match", [
    (np.array([[16]]), 4, "4-bit code must be in 0..15"),
    (np.array([[-1]]), 4, "must be in 0..15"),
    (np.array([[0.5]]), 4, "integer array"),
    (np.array([[1]]), 9, "bits must be an int in 1..8"),
    (np.array([[1]]), 0, "bits must be an int in 1..8"),
])
def test_pack_refuses_bad_codes(bad: np.ndarray, bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_rows(bad, bits)


def test_unpack_checks_the_word_count() -> None:
    with pytest.raises(ValueError, match="take 2 words per row, got 3"):
        unpack_rows(np.zeros((1, 3), np.uint32), 3, 11)
