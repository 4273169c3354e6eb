"""Cost-model features: hand-checked tile arithmetic, symbolic sizes, one-hot knobs, columns."""
from __future__ import annotations

import numpy as np
import pytest

from bitsmith.autotune.features import FeatureSpace, features, size_value, tensor_types
from bitsmith.codegen.template import Config, Problem
from bitsmith.codegen.tvm.templates import Conv2dNHWC, Dense, Rows
from bitsmith.errors import TuningError

DEV = {"device.cores": 8.0, "device.l1d_log2": 15.0, "device.l2_log2": 20.0,
       "device.l3_log2": 25.0, "device.lanes_f32": 16.0}
DENSE = Problem("dense", {"M": "64", "N": 100, "K": 256, "epilogue": "add,gelu", "dtype": "f32",
                          "w_index": 1, "sample_rows": 0, "transposed": True})


def dense_config(**knobs: object) -> Config:
    base = {"TILE_M": 4, "TILE_N": 32, "TILE_K": 0, "ROW_BLOCK": 0, "ORDER": "mn",
            "PARALLEL": True}
    return Dense.space.check(base | knobs)


def test_dense_tile_numbers_match_hand_arithmetic() -> None:
    f = features(DENSE.template, DENSE.params, dense_config(), DEV)
    assert (f["problem.M"], f["problem.N"], f["problem.K"]) == (64.0, 100.0, 256.0)
    assert f["problem.epilogue_ops"] == 2.0
    assert f["flops"] == 2 * 64 * 100 * 256
    # 4x32 f32 accumulators, a 256x32 weight panel, 4 rows of x of length 256
    assert (f["tile_acc_bytes"], f["tile_panel_bytes"], f["tile_x_bytes"]) == (512, 32768, 4096)
    assert f["tile_footprint_bytes"] == 37376
    assert f["footprint_l1d"] == pytest.approx(37376 / 32768)
    assert f["footprint_l2"] == pytest.approx(37376 / 2**20)
    assert f["tile_intensity"] == pytest.approx(2 * 4 * 32 * 256 / (32768 + 4096))
    assert f["padding_waste"] == pytest.approx((128 - 100) / 100)
    assert f["chunks_per_core"] == 4 / 8  # ceil(100/32) panels of every row, on 8 cores
    blocked = features(DENSE.template, DENSE.params, dense_config(ROW_BLOCK=4), DEV)
    assert blocked["chunks_per_core"] == 4 * 4 / 8  # ... of 4 blocks of 4 row tiles
    assert blocked["item_rows"] == 16 and f["item_rows"] == 64
    odd = features(DENSE.template, DENSE.params, dense_config(TILE_M=6), DEV)
    assert odd["row_padding_waste"] == pytest.approx((66 - 64) / 64)
    assert (f["trips_m"], f["trips_n"], f["trips_k"], f["trips_kc"]) == (16, 4, 256, 1)
    assert (f["vectors_per_row"], f["last_vector_fill"], f["acc_vectors"]) == (2.0, 1.0, 8.0)


def test_dense_split_reduction_serial_and_partial_vector() -> None:
    f = features("dense", DENSE.params, dense_config(TILE_K=64, TILE_N=48, PARALLEL=False),
                 DEV | {"device.lanes_f32": 32.0})
    assert f["tile_panel_bytes"] == 64 * 48 * 4 and f["tile_x_bytes"] == 4 * 64 * 4
    assert f["trips_kc"] == 4 and f["trips_k"] == 256
    assert f["chunks_per_core"] == 0.0  # not parallel
    assert f["vectors_per_row"] == 1.5 and f["last_vector_fill"] == 0.5
    assert f["padding_waste"] == pytest.approx((144 - 100) / 100)


@pytest.mark.parametrize("m, rows", [("(16*B)", 128.0), ("16*B", 128.0), ("B", 8.0),
                                     ("(B*S)", 64.0), ("37", 37.0), (12, 12.0)])
def test_symbolic_sizes_take_every_symbol_as_8(m: object, rows: float) -> None:
    assert size_value(m) == rows
    f = features("dense", DENSE.params | {"M": m}, dense_config(TILE_M=1), DEV)
    assert f["problem.M"] == rows and f["trips_m"] == np.ceil(rows)


def test_unreadable_size_says_what_it_got() -> None:
    with pytest.raises(TuningError, match=r"cannot read size 'B\+\+'"):
        size_value("B++")
    with pytest.raises(TuningError, match=r"template dense problem or config lacks 'K'"):
        features("dense", {"M": "4", "N": 16}, dense_config(), DEV)


def test_knobs_bools_are_0_1_and_strings_one_hot() -> None:
    f = features("dense", DENSE.params, dense_config(ORDER="nm", PARALLEL=False), DEV)
    assert f["ORDER=nm"] == 1.0 and "ORDER=mn" not in f and "ORDER" not in f
    assert f["PARALLEL"] == 0.0 and f["TILE_M"] == 4.0 and f["TILE_K"] == 0.0
    assert all(f[k] == v for k, v in DEV.items())
    assert all(isinstance(v, float) for v in f.values())


def test_conv2d_reduction_comes_from_the_weight_type() -> None:
    params = {"x": "tensor<Bx16x16x16xf32>", "w": "tensor<3x3x16x32xf32>", "OW": 8, "OC": 32,
              "stride": "(2, 2)", "padding": "(1, 1)", "dilation": "(1, 1)", "epilogue": "relu"}
    config = Conv2dNHWC.space.check({"TILE_W": 4, "TILE_C": 16, "ORDER": "mn",
                                       "PARALLEL": True})
    f = features("conv2d_nhwc", params, config, DEV)
    assert f["problem.reduction"] == 3 * 3 * 16 and f["problem.OH"] == 8  # (16+2-3)//2+1
    assert f["flops"] == 2 * 8 * 8 * 8 * 32 * 144  # batch 8 (B), 8x8 outputs, 32 channels
    assert f["tile_panel_bytes"] == 144 * 16 * 4 and f["tile_acc_bytes"] == 4 * 16 * 4
    assert (f["trips_m"], f["trips_n"], f["trips_rows"]) == (2, 2, 64)
    assert f["chunks_per_core"] == 8 * 8 * 2 * 2 / 8  # images x rows x 2 x 2 tiles, 8 cores


def test_signature_templates_get_knobs_and_the_largest_tensor() -> None:
    sig = "graph.matmul:tensor<Bx12x64x64xf32>;graph.softmax:tensor<Bx12x64x64xf32>;" \
          "graph.matmul:tensor<Bx12x64x(2*H)xf16>"
    config = Rows.space.check({"VECTORIZE": False, "MIN_PARALLEL": 4096,
                                "VECTOR_FACTOR": 4})
    f = features("rows", {"signature": sig}, config, DEV)
    assert f["problem.elements"] == 8 * 12 * 64 * 64 and f["problem.ops"] == 3
    assert f["VECTORIZE"] == 0.0 and f["MIN_PARALLEL"] == 4096.0
    assert not {"flops", "tile_footprint_bytes"} & set(f)


def test_tensor_types_read_quantized_and_rank_0_types() -> None:
    text = "tensor<4x(2*B)x!quant.weight<u4, group=128, axis=in>>;tensor<f32>;tensor<3xindex>"
    assert tensor_types(text) == [((4.0, 16.0), "!quant.weight<u4, group=128, axis=in>"),
                                  ((), "f32"), ((3.0,), "index")]


def test_feature_space_fixes_columns() -> None:
    rows = [{"b": 1.0, "a": 2.0}, {"c": 3.0}]
    space = FeatureSpace.fit(rows)
    assert space.columns == ("a", "b", "c") == FeatureSpace.fit(rows[::-1]).columns
    m = space.matrix([{"c": 5.0, "new": 9.0}, {}])  # missing -> 0, unknown ignored
    assert m.dtype == np.float32 and m.tolist() == [[0.0, 0.0, 5.0], [0.0, 0.0, 0.0]]
    assert space.matrix([]).shape == (0, 3)
    assert FeatureSpace.from_json(space.to_json()) == space
    with pytest.raises(TuningError, match="feature space: expected JSON"):
        FeatureSpace.from_json('{"cols": []}')


def test_an_implicit_gemm_convolution_has_the_dense_tile_features() -> None:
    """conv_gemm poses M = N*OH*OW output pixels, N output channels, K = KH*KW*I: the same
    register-tile arithmetic as dense (here 2 x 7 x 6 pixels, 40 channels, a 3x3x5 window)."""
    params = {"M": "84", "N": 40, "K": 45, "epilogue": "relu", "dtype": "f32",
              "sample_rows": 42, "w_index": 1, "transposed": False}
    f = features("conv_gemm", params, dense_config(TILE_M=6, TILE_N=16), DEV)
    assert f["flops"] == 2 * 84 * 40 * 45
    assert (f["trips_m"], f["trips_n"]) == (14, 3) and f["padding_waste"] == (48 - 40) / 40
