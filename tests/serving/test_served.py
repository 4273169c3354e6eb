"""The KServe v2 codec and the batching rules of a served model, without a server."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import orjson
import pytest

from bitsmith.errors import ServingError
from bitsmith.runtime.artifact import TensorSpec
from bitsmith.serving.kserve import (
    InvalidRequest,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from bitsmith.serving.served import ServedModel


def served(inputs, outputs, run=None, **options) -> ServedModel:
    return ServedModel("m", [TensorSpec(*s) for s in inputs], [TensorSpec(*s) for s in outputs],
                       run or (lambda *a: [a[0]]), **options)


def test_dynamic_batch_sizes_are_powers_of_two_and_the_maximum() -> None:
    model = served([("x", ("B", 5), "f32")], [("y", ("B", 5), "f32")], max_batch=12)
    assert model.dynamic and model.sizes == (1, 2, 4, 8, 12)
    assert served([("x", ("B", 5), "f32")], [("y", ("B",), "f32")], max_batch=1).sizes == (1,)
    custom = served([("x", ("B", 5), "f32")], [("y", ("B",), "f32")], max_batch=16,
                    batch_sizes=[3, 6])
    assert custom.sizes == (3, 6, 16)
    with pytest.raises(ServingError, match=r"batch sizes must lie in 1..max_batch=16, got \[20\]"):
        served([("x", ("B", 5), "f32")], [("y", ("B",), "f32")], max_batch=16,
               batch_sizes=[20])


def test_static_batch_artifacts_pad_to_their_batch_and_say_so_in_metadata() -> None:
    seen = []

    def run(x):
        seen.append(x.copy())
        return [x.sum(axis=1)]

    model = served([("x", (4, 2), "f32")], [("y", (4,), "f32")], run)
    assert model.static and model.sizes == (4,)
    assert model.signature.metadata("m")["inputs"][0]["shape"] == [-1, 2]
    a, b = np.ones((1, 2), np.float32), np.arange(4, dtype=np.float32).reshape(2, 2)
    outcome = model.run_batch([[a], [b]])
    assert outcome.rows == 3 and outcome.padded == 1 and not outcome.retried
    np.testing.assert_array_equal(seen[0], np.concatenate([a, b, b[-1:]]))
    np.testing.assert_array_equal(outcome.results[0][0], [2.0])
    np.testing.assert_array_equal(outcome.results[1][0], [1.0, 5.0])
    with pytest.raises(InvalidRequest, match=r"expected 1..4 batch rows \(dim 0\), got 5"):
        model.rows_of([np.zeros((5, 2), np.float32)])


def test_models_without_a_common_batch_dim_run_one_request_at_a_time() -> None:
    model = served([("x", (3, 2), "f32"), ("k", ("S",), "i64")], [("y", (2,), "f32")])
    assert not model.batchable and model.sizes == ()
    meta = model.signature.metadata("m")
    assert [t["shape"] for t in meta["inputs"]] == [[3, 2], [-1]]
    assert model.rows_of([np.zeros((3, 2)), np.zeros(7)]) == 1
    assert model.warmup_inputs() == []  # S has no size to warm up at


def test_symbols_shared_by_inputs_must_agree() -> None:
    model = served([("a", ("B", "S"), "f32"), ("b", ("B", "S"), "f32")],
                   [("y", ("B", "S"), "f32")])
    with pytest.raises(InvalidRequest, match="input 'b': dim 1 is S = 4 from an earlier input, "
                                             "got 5"):
        model.rows_of([np.zeros((1, 4)), np.zeros((1, 5))])
    with pytest.raises(InvalidRequest, match=r"dim 0 is the batch and must agree, got \[1, 2\]"):
        model.rows_of([np.zeros((1, 4)), np.zeros((2, 4))])


def test_a_failed_batch_reruns_each_request_alone() -> None:
    def run(x):
        if (x < 0).any():
            raise RuntimeError("negative")
        return [x + 1]

    model = served([("x", ("B", 2), "f32")], [("y", ("B", 2), "f32")], run, max_batch=8)
    good, bad = np.ones((2, 2), np.float32), -np.ones((1, 2), np.float32)
    outcome = model.run_batch([[good], [bad], [good * 3]])
    assert outcome.retried
    np.testing.assert_array_equal(outcome.results[0][0], good + 1)
    assert isinstance(outcome.results[1], RuntimeError)
    np.testing.assert_array_equal(outcome.results[2][0], good * 3 + 1)


@pytest.mark.parametrize("dtype,datatype", [(np.int8, "INT8"), (np.uint16, "UINT16"),
                                            (np.float16, "FP16"), (np.bool_, "BOOL"),
                                            (ml_dtypes.bfloat16, "BF16")])
def test_codec_round_trips_every_datatype(dtype, datatype) -> None:
    ir = {"INT8": "i8", "UINT16": "u16", "FP16": "f16", "BOOL": "bool", "BF16": "bf16"}[datatype]
    model = served([("x", ("B", 3), ir)], [("y", ("B", 3), ir)])
    x = (np.arange(6).reshape(2, 3) % 2).astype(dtype)
    body = encode_request(["x"], [x], request_id="q")
    assert orjson.loads(body)["inputs"][0]["datatype"] == datatype
    decoded = decode_request(body, model.signature)
    assert decoded.id == "q" and decoded.outputs == (0,)
    assert decoded.arrays[0].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded.arrays[0], x)
    answer = decode_response(encode_response("m", "q", model.outputs, [x]))
    np.testing.assert_array_equal(answer["y"].astype(np.float32), x.astype(np.float32))


@pytest.mark.parametrize("datatype,ir,data,message", [
    ("INT8", "i8", [1, 200, 3], "expected INT8 values, got values in range (first: [1])"),
    ("INT64", "i64", [1.5, 2, 3], "expected INT64 values, got values of kind float64"),
    ("BOOL", "bool", [1, 0, 1], "expected BOOL values, got values of kind int64"),
    ("UINT8", "u8", [-1, 0, 1], "expected UINT8 values, got values in range (first: [-1])"),
    ("FP32", "f32", [True, False, True], "expected FP32 values, got values of kind bool"),
])
def test_codec_refuses_values_a_cast_would_change(datatype, ir, data, message) -> None:
    model = served([("x", ("B", 3), ir)], [("y", ("B", 3), ir)])
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": datatype,
                                     "data": data}]})
    with pytest.raises(InvalidRequest) as info:
        decode_request(body, model.signature)
    assert info.value.status == 400 and message in str(info.value)
