"""An index out of range is an error, as in torch, never a clipped row: embedding, gather,
x[idx] (aten.index), index_select and torch.take (which torch decomposes to an index into the
flattened tensor), compiled (static and dynamic batch, saved and reloaded, TVM and Triton),
interpreted and served. Kernels still clamp indices (memory safety); the runtime checks the
index operands before the kernel that reads them runs."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import bitsmith
from bitsmith.compiler import build_artifact
from bitsmith.errors import CodegenError, IndexOutOfRangeError
from bitsmith.frontend import from_torch
from bitsmith.ir import Module
from bitsmith.ir.interpreter import interpret
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.model import CompiledModel
from bitsmith.serving.kserve import decode_response, encode_request
from bitsmith.serving.served import ServedModel
from bitsmith.serving.server import ServeOptions

from .passes.fusion_checks import fuse, kernels, parse, separate, weights
from .serving.live import LiveServer, metric, post_many

TORCH_INDEX_ERRORS = (IndexError, RuntimeError)  # torch.gather raises RuntimeError
EXAMPLE_BATCH = 3


class Embedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


class Gather(torch.nn.Module):
    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, index)


class TableIndex(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(13, 4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class RowIndex(torch.nn.Module):
    """x[i]: the indexed dim is the batch, symbolic under dynamic_batch."""

    def forward(self, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return x[i]


class IndexSelect(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(9, 4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.index_select(self.table, 0, ids)


class Take(torch.nn.Module):
    """torch.take indexes the flattened x: a range of 5 * B under dynamic_batch."""

    def forward(self, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return torch.take(x, i)


@dataclass(frozen=True)
class Case:
    """A model whose last input holds indices into a dim of `size(batch)`."""

    model: Callable[[], torch.nn.Module]
    data: Callable[[int], list[torch.Tensor]]  # the other inputs, for a batch
    index_shape: Callable[[int], tuple[int, ...]]
    size: Callable[[int], int]
    negative: bool  # whether torch takes [-size, size) rather than [0, size)

    def low(self, batch: int) -> int:
        return -self.size(batch) if self.negative else 0

    def inputs(self, batch: int, index: np.ndarray) -> list[torch.Tensor]:
        return [*self.data(batch), torch.from_numpy(index)]

    def good_index(self, batch: int, seed: int) -> np.ndarray:
        """Random valid indices, with both ends of the range among them."""
        rng = np.random.default_rng(seed)
        index = rng.integers(self.low(batch), self.size(batch), self.index_shape(batch))
        index.flat[0], index.flat[-1] = self.low(batch), self.size(batch) - 1
        return index


def _floats(*shape: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(sum(shape)).standard_normal(shape)
                            .astype(np.float32))


CASES = {
    "embedding": Case(Embedding, lambda b: [], lambda b: (b, 3), lambda b: 11, False),
    "gather": Case(Gather, lambda b: [_floats(b, 7)], lambda b: (b, 4), lambda b: 7, False),
    "index": Case(TableIndex, lambda b: [], lambda b: (b, 2), lambda b: 13, True),
    "index_rows": Case(RowIndex, lambda b: [_floats(b, 6)], lambda b: (b,), lambda b: b, True),
    "index_select": Case(IndexSelect, lambda b: [], lambda b: (b,), lambda b: 9, False),
    "take": Case(Take, lambda b: [_floats(b, 5)], lambda b: (b, 2), lambda b: 5 * b, True),
}


def batches(dynamic: bool) -> tuple[int, ...]:
    return (1, 5) if dynamic else (EXAMPLE_BATCH,)


@functools.cache
def _torch_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return CASES[name].model().eval()


@functools.cache
def compiled(name: str, dynamic: bool) -> tuple[CompiledModel, Module]:
    """The compiled model, and its fused module for the interpreter (once per test run)."""
    case, model = CASES[name], _torch_model(name)
    example = case.inputs(EXAMPLE_BATCH, case.good_index(EXAMPLE_BATCH, 0))
    module = from_torch(model, example, {}, dynamic_batch=dynamic, name=name)
    bitsmith.passes.run(module, bitsmith.passes.default_pipeline("cpu"))
    return bitsmith.compile(model, example, dynamic_batch=dynamic), module


def torch_out(name: str, inputs: list[torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return _torch_model(name)(*inputs).numpy()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(CASES))
def test_in_range_indices_match_torch(name: str, dynamic: bool) -> None:
    case = CASES[name]
    cm, module = compiled(name, dynamic)
    for batch in batches(dynamic):
        inputs = case.inputs(batch, case.good_index(batch, seed=batch))
        want = torch_out(name, inputs)
        np.testing.assert_array_equal(cm(*[t.numpy() for t in inputs]), want)
        np.testing.assert_array_equal(interpret(module, *[t.numpy() for t in inputs])[0], want)


@pytest.mark.parametrize("side", ["too_large", "too_negative"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(CASES))
def test_out_of_range_index_raises_like_torch(name: str, dynamic: bool, side: str) -> None:
    case = CASES[name]
    cm, module = compiled(name, dynamic)
    batch = batches(dynamic)[-1]
    low, size = case.low(batch), case.size(batch)
    bad = size if side == "too_large" else low - 1
    index = case.good_index(batch, seed=7)
    index.flat[index.size // 2] = bad
    inputs = case.inputs(batch, index)
    with pytest.raises(TORCH_INDEX_ERRORS):
        torch_out(name, inputs)
    message = rf"index {bad} out of range \[{low}, {size}\)"
    arrays = [t.numpy() for t in inputs]
    with pytest.raises(IndexOutOfRangeError, match=message):
        cm(*arrays)
    with pytest.raises(IndexOutOfRangeError, match=message):
        cm(*inputs)  # torch tensors in
    with pytest.raises(IndexOutOfRangeError, match=message):
        interpret(module, *arrays)


class Shifted(torch.nn.Module):
    """Indices computed inside the model: ids * 2 + offset."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 3)
        self.offset = offset

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids * 2 + self.offset) * 2.0


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_indices_computed_in_the_model_are_checked(dynamic: bool) -> None:
    torch.manual_seed(0)
    model = Shifted(offset=1).eval()
    ids = torch.tensor([[0, 4, 2], [1, 3, 0]])
    cm = bitsmith.compile(model, (ids,), dynamic_batch=dynamic)
    steps = cm.artifact.manifest.plan["steps"]
    computed = {vid for step in steps for vid in step["outputs"]}
    checks = [c for step in steps for c in step.get("index_checks", ())]
    assert checks and all(c["value"] in computed for c in checks), steps
    np.testing.assert_array_equal(cm(ids.numpy()), model(ids).detach().numpy())
    for bad_ids, bad in ((ids.clone().fill_(5), 11), (ids.clone().fill_(-1), -1)):
        with pytest.raises(TORCH_INDEX_ERRORS):
            model(bad_ids)
        with pytest.raises(IndexOutOfRangeError, match=rf"embedding.*\(from kernel k\d+_.*"
                                                       rf"index {bad} out of range \[0, 10\)"):
            cm(bad_ids.numpy())


class CastIds(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 3)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids.to(self.dtype))


def test_a_widening_cast_fuses_and_the_input_is_checked() -> None:
    torch.manual_seed(0)
    model = CastIds(torch.int64).eval()
    ids = torch.tensor([[0, 9, 3]], dtype=torch.int32)
    cm = bitsmith.compile(model, (ids,), dynamic_batch=True)
    (step,) = cm.artifact.manifest.plan["steps"]  # cast and embedding: one kernel
    assert [c["value"] for c in step["index_checks"]] == ["in0"]
    assert "input 'ids'" in step["index_checks"][0]["what"]
    np.testing.assert_array_equal(cm(ids.numpy()), model(ids).detach().numpy())
    with pytest.raises(IndexOutOfRangeError, match=r"input 'ids'.*index 10 out of range"):
        cm(np.array([[1, 10, 2]], np.int32))


def test_a_narrowing_cast_is_checked_after_it_wraps() -> None:
    """int64 -> int32 wraps (2**32 + 1 -> 1, a valid id in torch too): the check must read
    the cast's result, not the input."""
    torch.manual_seed(0)
    model = CastIds(torch.int32).eval()
    ids = torch.tensor([[2**32 + 1, 9, 3]])
    cm = bitsmith.compile(model, (ids,))
    np.testing.assert_array_equal(cm(ids.numpy()), model(ids).detach().numpy())
    with pytest.raises(IndexOutOfRangeError, match=r"from kernel .*index 10 out of range"):
        cm(np.array([[2**32 + 10, 1, 2]]))


class ConstantIndex(torch.nn.Module):
    def __init__(self, index: list[int]) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(6, 3))
        self.register_buffer("index", torch.tensor(index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[self.get_buffer("index")] + x


def test_constant_indices_are_checked_when_compiling() -> None:
    model = ConstantIndex([0, 9]).eval()
    x = torch.randn(2, 3)
    with pytest.raises(TORCH_INDEX_ERRORS):
        model(x)
    with pytest.raises(IndexOutOfRangeError, match=r"constant indices.*index 9 out of range "
                                                   r"\[-6, 6\)"):
        bitsmith.compile(model, (x,))
    fine = ConstantIndex([0, -6, 5]).eval()
    np.testing.assert_array_equal(bitsmith.compile(fine, (x[:1],))(x[:1].numpy()),
                                  fine(x[:1]).detach().numpy())


class ConstantRows(torch.nn.Module):
    """Constant indices into the (symbolic) batch dim: checked when the batch is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[torch.tensor([0, 3])] * 2.0


def test_constant_indices_into_a_symbolic_dim_are_checked_per_batch() -> None:
    model = ConstantRows()
    cm = bitsmith.compile(model, (torch.randn(5, 4),), dynamic_batch=True)
    x = torch.randn(4, 4)
    np.testing.assert_array_equal(cm(x.numpy()), model(x).numpy())
    with pytest.raises(TORCH_INDEX_ERRORS):
        model(x[:3])
    with pytest.raises(IndexOutOfRangeError, match=r"constant indices\): index 3 out of "
                                                   r"range \[-3, 3\)"):
        cm(x[:3].numpy())


def test_a_saved_artifact_still_checks(tmp_path: Path) -> None:
    cm, _ = compiled("embedding", True)
    cm.save(tmp_path / "emb.bsm")
    again = bitsmith.load(tmp_path / "emb.bsm")
    case = CASES["embedding"]
    good = case.inputs(4, case.good_index(4, seed=1))
    np.testing.assert_array_equal(again(good[0].numpy()), torch_out("embedding", good))
    with pytest.raises(IndexOutOfRangeError, match=r"index 11 out of range \[0, 11\)"):
        again(np.array([[0, 11, 2]]))


def test_a_plan_without_checks_still_runs() -> None:
    """Artifacts written before index checks existed load and run (without checks)."""
    cm, _ = compiled("embedding", True)
    manifest = cm.artifact.manifest
    steps = [{k: v for k, v in s.items() if k != "index_checks"} for s in manifest.plan["steps"]]
    old = dataclasses.replace(manifest, plan={**manifest.plan, "steps": steps})
    legacy = CompiledModel(Artifact(old, cm.artifact.weights, cm.artifact.libraries))
    case = CASES["embedding"]
    good = case.inputs(2, case.good_index(2, seed=3))
    np.testing.assert_array_equal(legacy(good[0].numpy()), torch_out("embedding", good))


def test_the_triton_executor_checks_indices() -> None:
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = Shifted(offset=0).eval()
    ids = torch.tensor([[0, 4, 2], [1, 3, 0]])
    cm = bitsmith.compile(model, (ids,), target="cuda", dynamic_batch=True)
    assert any(s.get("index_checks") for s in cm.artifact.manifest.plan["steps"])
    np.testing.assert_array_equal(cm(ids.numpy()), model(ids).detach().numpy())
    bad = torch.tensor([[0, 5, 1]])
    with pytest.raises(TORCH_INDEX_ERRORS):
        model(bad)
    for run in (lambda: cm(bad.numpy()), lambda: cm(bad)):
        with pytest.raises(IndexOutOfRangeError, match=r"index 10 out of range \[0, 10\)"):
            run()


def test_the_server_answers_400_for_an_out_of_range_id() -> None:
    cm, _ = compiled("embedding", True)
    model = ServedModel.from_compiled("emb", cm, max_batch=4)
    good = [np.array([[0, 10, 3]]), np.array([[4, 4, 4], [1, 2, 3]])]
    bad = np.array([[1, 11, 2]])
    with LiveServer([model], ServeOptions(timeout_ms=60_000)) as server:
        url = server.infer_url("emb")
        answers = post_many(url, [encode_request(["ids"], [x]) for x in [*good, bad]])
        metrics_400 = metric(server, "bitsmith_requests_total", model="emb", code="400",
                             reason="invalid")
    for answer, ids in zip(answers[:2], good, strict=True):  # batch-mates of the bad one too
        assert answer.status == 200, answer.body
        want = torch_out("embedding", [torch.from_numpy(ids)])
        np.testing.assert_array_equal(decode_response(answer.body)["output0"], want)
    assert answers[2].status == 400, answers[2].body
    error = answers[2].json()["error"]
    assert "index 11 out of range [0, 11)" in error and "input 'ids'" in error, error
    assert metrics_400 == 1


IDS = "tensor<3x4xi64>"
E = "tensor<3x4x6xf32>"
TABLE = '%0 = "graph.constant"() {weight = "table"} : () -> tensor<11x6xf32>'


def _fused(body: list[str], ids_type: str, dtype: type) -> tuple[Module, list[str]]:
    module = parse([TABLE, *body], {"ids": ids_type}, [E], weights(table=(11, 6)))
    ids = np.random.default_rng(0).integers(0, 5, (3, 4)).astype(dtype)
    return module, separate(fuse(module, inputs=[ids]))


def test_fusion_keeps_computed_indices_out_of_the_reading_kernel() -> None:
    module, refusals = _fused([
        f'%1 = "graph.add"(%ids, %ids) : ({IDS}, {IDS}) -> {IDS}',
        f'%2 = "graph.embedding"(%0, %1) : (tensor<11x6xf32>, {IDS}) -> {E}',
        f'"func.return"(%2) : ({E}) -> ()'], IDS, np.int64)
    assert [ops for _, ops in kernels(module)] == [["graph.add"], ["graph.embedding"]]
    assert any("range-checked" in r for r in refusals), refusals


def test_fusion_lets_a_reshape_and_widening_cast_of_indices_join() -> None:
    i32, flat = "tensor<3x4xi32>", "tensor<12xi32>"
    module, _ = _fused([
        f'%1 = "graph.reshape"(%ids) : ({i32}) -> {flat}',
        f'%2 = "graph.reshape"(%1) : ({flat}) -> {i32}',
        f'%3 = "graph.cast"(%2) {{dtype = i64}} : ({i32}) -> {IDS}',
        f'%4 = "graph.embedding"(%0, %3) : (tensor<11x6xf32>, {IDS}) -> {E}',
        f'"func.return"(%4) : ({E}) -> ()'], i32, np.int32)
    assert [ops for _, ops in kernels(module)] == [
        ["graph.reshape", "graph.reshape", "graph.cast", "graph.embedding"]]
    (step,) = build_artifact(module).manifest.plan["steps"]
    assert [c["value"] for c in step["index_checks"]] == ["in0"]


def test_the_planner_refuses_indices_computed_inside_a_kernel() -> None:
    """A pipeline that fuses without the rule (here: one hand-made kernel) cannot ship."""
    module = parse([
        TABLE,
        '%1 = "kernel.fused"(%0, %ids) ({',
        f'^bb0(%arg0: tensor<11x6xf32>, %arg1: {IDS}):',
        f'  %2 = "graph.add"(%arg1, %arg1) : ({IDS}, {IDS}) -> {IDS}',
        f'  %3 = "graph.embedding"(%arg0, %2) : (tensor<11x6xf32>, {IDS}) -> {E}',
        f'  "kernel.yield"(%3) : ({E}) -> ()',
        f'}}) {{kind = "injective", name = "k0_add_embedding"}} : '
        f'(tensor<11x6xf32>, {IDS}) -> {E}',
        f'"func.return"(%1) : ({E}) -> ()'], {"ids": IDS}, [E], weights(table=(11, 6)))
    with pytest.raises(CodegenError, match=r"indices.*computed inside the kernel"):
        build_artifact(module)
