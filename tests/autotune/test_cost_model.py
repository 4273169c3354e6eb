"""The XGBoost cost model on a synthetic task whose time is a known function of the knobs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bitsmith.autotune.cost_model import (
    MIN_RECORDS,
    OBJECTIVES,
    CostModel,
    select_objective,
    top_k_recall,
)
from bitsmith.autotune.features import features
from bitsmith.codegen.template import Config
from bitsmith.codegen.tvm.templates import Dense
from bitsmith.errors import TuningError

DEV = {"device.cores": 8.0, "device.l1d_log2": 15.0, "device.l2_log2": 20.0,
       "device.l3_log2": 25.0, "device.lanes_f32": 16.0}
TASKS = [(64, 256, 512), (256, 96, 128), (32, 1024, 1024)]


def synthetic_time(f: dict[str, float]) -> float:
    """Seconds of a made-up machine: register use, padding, cache fit and cores matter."""
    acc = f["acc_vectors"]
    efficiency = min(acc, 24) / 24 * (1.0 if acc <= 28 else 0.25)  # 32 vector registers
    efficiency *= (1.0 if f["footprint_l1d"] < 1 else 0.6) / (1 + f["padding_waste"])
    speedup = min(8.0, 8 * f["chunks_per_core"]) if f["PARALLEL"] else 1.0
    return f["flops"] / (1e10 * efficiency * max(speedup, 1.0)) * (1 + 0.1 * f.get("ORDER=nm", 0))


def records(seed: int, sigma: float = 0.05) -> tuple[list, list, list]:
    """Every dense config of each task, timed with log-normal noise."""
    rng = np.random.default_rng(seed)
    rows, times, groups = [], [], []
    for m, n, k in TASKS:
        params = {"M": str(m), "N": n, "K": k, "epilogue": "", "dtype": "f32"}
        for config in Dense.space.configs():
            f = features("dense", params, config, DEV)
            rows.append(f)
            times.append(synthetic_time(f) * math.exp(rng.normal(0.0, sigma)))
            groups.append(f"dense:{m}x{n}x{k}")
    return rows, times, groups


@pytest.fixture(scope="module")
def data() -> tuple[list, list, list]:
    return records(seed=0)


def subset(data: tuple, idx: np.ndarray) -> tuple[list, list, list]:
    return tuple([column[i] for i in idx] for column in data)


def split(data: tuple, held_out: float = 0.3) -> tuple[tuple, tuple]:
    """(train, held-out) records, ~30% held out at random."""
    order = np.random.default_rng(1).permutation(len(data[0]))
    cut = int(len(order) * held_out)
    return subset(data, order[cut:]), subset(data, order[:cut])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_trained_model_ranks_held_out_configs_far_better_than_random(
        data: tuple, objective: str) -> None:
    train, held = split(data)
    model = CostModel(objective).fit(*train)
    assert model.trained and model.records == len(train[0])
    quality = model.ranking_quality(*held)
    rng = np.random.default_rng(2)
    random = np.mean([top_k_recall(rng.random(len(held[0])), held[1], held[2])
                      for _ in range(50)])
    assert random < 0.2 and quality > 0.6, (quality, random)


def test_known_faster_config_scores_higher(data: tuple) -> None:
    model = CostModel("rank:pairwise").fit(*data)
    params = {"M": "64", "N": 256, "K": 512, "epilogue": "", "dtype": "f32"}
    fast = Config({"TILE_M": 6, "TILE_N": 64, "TILE_K": 0, "ORDER": "mn", "PARALLEL": True})
    slow = Config({"TILE_M": 1, "TILE_N": 16, "TILE_K": 0, "ORDER": "nm", "PARALLEL": False})
    rows = [features("dense", params, c, DEV) for c in (fast, slow)]
    assert synthetic_time(rows[0]) * 10 < synthetic_time(rows[1])
    scores = model.predict(rows)
    assert scores[0] > scores[1]


def test_select_objective_records_both_scores_and_keeps_the_better(data: tuple) -> None:
    model = select_objective(*data, seed=0)
    assert set(model.scores) == set(OBJECTIVES)
    assert all(0.0 <= s <= 1.0 for s in model.scores.values())
    assert model.scores[model.objective] == max(model.scores.values())
    assert model.trained and model.records == len(data[0])  # refit on everything
    assert select_objective(*data, seed=0).scores == model.scores  # deterministic by seed


def test_save_load_round_trip_predicts_identically(data: tuple, tmp_path: Path) -> None:
    model = select_objective(*data, seed=0)
    model.save(tmp_path / "model")
    loaded = CostModel.load(tmp_path / "model")
    assert (loaded.objective, loaded.scores, loaded.records) == (
        model.objective, model.scores, model.records)
    assert loaded.space == model.space
    rows = data[0][::7] + [{"TILE_M": 4.0, "unseen_feature": 3.0}]
    assert np.array_equal(loaded.predict(rows), model.predict(rows))


def test_untrained_model_predicts_zeros(data: tuple, tmp_path: Path) -> None:
    rows, times, groups = (d[:MIN_RECORDS - 1] for d in data)
    model = CostModel().fit(rows, times, groups)
    assert not model.trained and not CostModel().trained
    assert model.predict(data[0][:5]).tolist() == [0.0] * 5
    model.save(tmp_path / "m")
    assert not CostModel.load(tmp_path / "m").trained
    few = select_objective(rows, times, groups)
    assert not few.trained and few.scores == {}


def test_failed_configs_are_left_out_of_training(data: tuple) -> None:
    rows, times, groups = (d[:20] for d in data)
    model = CostModel("reg:squarederror").fit(rows, times[:10] + [math.inf] * 10, groups)
    assert model.trained and model.records == 10
    assert np.all(np.isfinite(model.predict(rows)))


def test_top_k_recall_by_hand() -> None:
    times = [float(t) for t in range(1, 21)] + [1.0, 2.0]
    groups = ["a"] * 20 + ["b"] * 2
    # group a: k = 2, the best are t=1 and t=2; the model's top 2 are t=1 and t=5
    scores = np.zeros(22)
    scores[[0, 4]] = [2.0, 1.0]
    scores[21] = 1.0  # group b ranks its slower config first: recall 0
    assert top_k_recall(scores, times, groups) == pytest.approx((0.5 + 0.0) / 2)
    with pytest.raises(TuningError, match="at least 2 records"):
        top_k_recall(np.zeros(1), [1.0], ["a"])


def test_bad_inputs_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(TuningError, match=r"objective 'rank:ndcg' is not one of"):
        CostModel("rank:ndcg")
    with pytest.raises(TuningError, match="differ in length: 2, 1, 1"):
        CostModel().fit([{}, {}], [1.0], ["a"])
    with pytest.raises(TuningError, match="times must be positive"):
        CostModel().fit([{}], [0.0], ["a"])
    with pytest.raises(TuningError, match="cannot load .*delete it to retrain"):
        CostModel.load(tmp_path / "nothing")
