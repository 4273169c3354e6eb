"""Dense bit packing of 1..8-bit codes into 32-bit words, with no padding to a power of two.

Two layouts, both exact (unpack(pack(c)) == c for every width and length):

- **rows** (`pack_rows` / `unpack_rows`), the IR's and the artifact's storage form: each row
  (the last axis) is one little-endian bit stream; code k occupies bits [k*b, (k+1)*b) of it,
  word w holding stream bits [32w, 32w+32). A code may straddle two words. Only the row's
  last word is padded (with zero bits), so a row of K codes takes ceil(K*b/32) words.
- **lanes** (`pack_lanes` / `unpack_lanes`), what the CPU kernels unpack: along K, blocks of
  `32 * lanes` codes; inside a block code `i * lanes + l` sits at position i of lane l's
  stream, and the block is stored as b vectors of `lanes` words ([..., block, b, lanes]), word
  (j, l) holding bits [32j, 32j+32) of lane l's 32*b-bit stream. So one vector load gives every
  lane the same stream bits, each of the 32 positions is extracted by the same constant shifts
  in every lane, and position i of a block lines up with the activations [i*lanes, i*lanes +
  lanes). K is padded with zero codes to a whole block.

Codes are the formats' bit patterns (`DType.to_bits`), held as uint8.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import PackingError
from .types import QuantType, TensorType

WORD = 32
"""Bits per storage word."""
CHUNK = 32
"""Codes whose bits fill exactly `bits` words, for any width: the period of the rows layout."""


def _check(codes: np.ndarray, bits: int) -> np.ndarray:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise PackingError(f"pack: bits must be an int in 1..8, got {bits!r}")
    c = np.asarray(codes)
    if c.dtype.kind not in "biu":
        raise PackingError(f"pack: codes must be an integer array, got dtype {c.dtype}")
    if c.size and (c.min() < 0 or c.max() >= 1 << bits):
        bad = c[(c < 0) | (c >= 1 << bits)].flat[0]
        raise PackingError(f"pack: a {bits}-bit code must be in 0..{(1 << bits) - 1}, got {bad}")
    return c.astype(np.uint32)


def row_words(length: int, bits: int) -> int:
    """Words of one packed row of `length` codes."""
    return -(-length * bits // WORD)


def _pack_chunks(c: np.ndarray, bits: int) -> np.ndarray:
    """[..., n, 32] uint32 codes -> [..., n, bits] words."""
    out = np.zeros(c.shape[:-1] + (bits,), np.uint32)
    for i in range(CHUNK):
        word, off = divmod(i * bits, WORD)
        out[..., word] |= c[..., i] << np.uint32(off)
        if off + bits > WORD:  # the high bits go to the next word
            out[..., word + 1] |= c[..., i] >> np.uint32(WORD - off)
    return out


def _unpack_chunks(w: np.ndarray, bits: int) -> np.ndarray:
    """[..., n, bits] words -> [..., n, 32] uint8 codes."""
    mask = np.uint32((1 << bits) - 1)
    out = np.empty(w.shape[:-1] + (CHUNK,), np.uint8)
    for i in range(CHUNK):
        word, off = divmod(i * bits, WORD)
        v = w[..., word] >> np.uint32(off)
        if off + bits > WORD:
            v = v | (w[..., word + 1] << np.uint32(WORD - off))
        out[..., i] = v & mask
    return out


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., K] -> uint32 words [..., ceil(K*bits/32)] (the rows layout)."""
    c = _check(codes, bits)
    k = c.shape[-1]
    pad = -k % CHUNK
    c = np.concatenate([c, np.zeros(c.shape[:-1] + (pad,), np.uint32)], axis=-1)
    words = _pack_chunks(c.reshape(c.shape[:-1] + (-1, CHUNK)), bits)
    return np.ascontiguousarray(words.reshape(c.shape[:-1] + (-1,))[..., :row_words(k, bits)])


def unpack_rows(words: np.ndarray, bits: int, length: int) -> np.ndarray:
    """uint32 words [..., W] -> uint8 codes [..., length]; inverse of `pack_rows`."""
    w = np.asarray(words)
    if w.dtype != np.uint32:
        raise PackingError(f"unpack: packed words must be uint32, got {w.dtype}")
    if w.shape[-1] != row_words(length, bits):
        raise PackingError(f"unpack: {length} codes of {bits} bits take {row_words(length, bits)} "
                         f"words per row, got {w.shape[-1]}")
    chunks = -(-length // CHUNK)
    pad = chunks * bits - w.shape[-1]
    w = np.concatenate([w, np.zeros(w.shape[:-1] + (pad,), np.uint32)], axis=-1)
    codes = _unpack_chunks(w.reshape(w.shape[:-1] + (chunks, bits)), bits)
    return np.ascontiguousarray(codes.reshape(w.shape[:-1] + (-1,))[..., :length])


def lane_blocks(length: int, lanes: int) -> int:
    """Blocks of the lanes layout along a row of `length` codes."""
    return -(-length // (CHUNK * lanes))


def pack_lanes(codes: np.ndarray, bits: int, lanes: int = 16) -> np.ndarray:
    """Codes [..., K] -> uint32 [..., blocks, bits, lanes] (the lanes layout)."""
    c = _check(codes, bits)
    k = c.shape[-1]
    block = CHUNK * lanes
    c = np.concatenate([c, np.zeros(c.shape[:-1] + (-k % block,), np.uint32)], axis=-1)
    c = c.reshape(c.shape[:-1] + (-1, CHUNK, lanes))
    words = _pack_chunks(np.swapaxes(c, -1, -2), bits)  # [..., blocks, lanes, bits]
    return np.ascontiguousarray(np.swapaxes(words, -1, -2))


def unpack_lanes(words: np.ndarray, bits: int, length: int) -> np.ndarray:
    """uint32 [..., blocks, bits, lanes] -> uint8 codes [..., length]; inverse of
    `pack_lanes`."""
    w = np.asarray(words)
    if w.dtype != np.uint32 or w.ndim < 3 or w.shape[-2] != bits:
        raise PackingError(f"unpack: expected uint32 words [..., blocks, {bits}, lanes], got "
                         f"{w.dtype}{list(w.shape)}")
    lanes = w.shape[-1]
    if w.shape[-3] != lane_blocks(length, lanes):
        raise PackingError(f"unpack: {length} codes take {lane_blocks(length, lanes)} blocks of "
                         f"{CHUNK * lanes}, got {w.shape[-3]}")
    codes = _unpack_chunks(np.swapaxes(w, -1, -2), bits)  # [..., blocks, lanes, 32]
    codes = np.swapaxes(codes, -1, -2).reshape(w.shape[:-3] + (-1,))
    return np.ascontiguousarray(codes[..., :length])


def rows_to_lanes(words: np.ndarray, bits: int, length: int, lanes: int = 16) -> np.ndarray:
    """Re-pack rows-layout words into the lanes layout (what a kernel's weight pre-pack does)."""
    return pack_lanes(unpack_rows(words, bits, length), bits, lanes)


def stored_nbytes(type: TensorType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `type` (at concrete `shape`) takes as stored: quantized weights
    packed in rows layout, everything else in its numpy dtype."""
    if isinstance(type.dtype, QuantType):
        return shape[0] * row_words(shape[1], type.dtype.bits) * 4
    return math.prod(shape) * np.dtype(type.dtype.numpy_dtype).itemsize


def to_storage(type: TensorType, array: np.ndarray) -> np.ndarray:
    """An interpreter value as a kernel receives it (quantized codes packed, rows layout)."""
    if isinstance(type.dtype, QuantType):
        return pack_rows(array, type.dtype.bits)
    return array
