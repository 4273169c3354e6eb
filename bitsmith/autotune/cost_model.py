"""An XGBoost cost model over config features: which configs of a task are likely fastest.

Two objectives are offered: `rank:pairwise` (labels -log(time), one query group per task, so only
the order within a task is learned) and `reg:squarederror` (predicts log(time) across tasks).
Either way `predict` returns scores where higher means predicted faster. `select_objective` fits
both on part of each task's records and keeps the one that ranks the held-out part better.

Ranking quality is top-10% recall: per task, the fraction of the model's top 10% of configs
(at least 1) whose measured time is within the truly best 10%; the mean over tasks. It rewards
exactly what a tuner uses a model for: putting the few best configs first. A random ranking
scores about 0.1 (1/n for tasks with fewer than 20 configs).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xgboost as xgb

from ..errors import TuningError
from .features import FeatureSpace

OBJECTIVES = ("rank:pairwise", "reg:squarederror")
"""Supported objectives; on a tie in `select_objective` the first wins."""

MIN_RECORDS = 8
"""Below this many records a model stays untrained and predicts zeros."""

TOP_FRACTION = 0.1
HOLDOUT_FRACTION = 0.3
ROUNDS = 150
PARAMS = {"max_depth": 6, "eta": 0.2, "nthread": 1, "verbosity": 0}
"""One thread: the models are small (0.1-0.2 s per fit), and with 2 OpenMP threads on a busy
2-core host a fit was seen to take 10-50 s (threads spinning at barriers), and would also disturb
the timings a tuner takes while it trains."""
RANK_PARAMS = {"lambdarank_pair_method": "mean", "lambdarank_num_pair_per_sample": 8}
"""Sampled pairs keep pairwise training linear in the records of a large task."""
FORMAT = 1
"""Version of the saved-model directory layout."""

Rows = Sequence[Mapping[str, float]]
Times = Sequence[float] | np.ndarray
"""Seconds per record (inf for a failed config), as a sequence or a float array."""


def top_k_recall(scores: np.ndarray, times: Times, groups: Sequence[str],
                 fraction: float = TOP_FRACTION) -> float:
    """Mean over groups of the share of the top-scored `fraction` that is truly best."""
    scores, times_a = np.asarray(scores, dtype=np.float64), np.asarray(times, dtype=np.float64)
    groups_a = np.asarray(groups, dtype=object)
    recalls = []
    for group in dict.fromkeys(groups):
        idx = np.flatnonzero(groups_a == group)
        if len(idx) < 2:
            continue  # one config: any ranking is perfect, so it says nothing
        k = max(1, int(len(idx) * fraction))
        kth_best = np.sort(times_a[idx])[k - 1]
        chosen = idx[np.argsort(-scores[idx], kind="stable")[:k]]
        recalls.append(float(np.count_nonzero(times_a[chosen] <= kth_best)) / k)
    if not recalls:
        raise TuningError("ranking quality needs a task (group) with at least 2 records; "
                          f"got {len(times)} records in {len(set(groups))} groups")
    return float(np.mean(recalls))


def _check_records(rows: Rows, times: Times, groups: Sequence[str]) -> np.ndarray:
    if not len(rows) == len(times) == len(groups):
        raise TuningError(f"cost model: rows, times and groups differ in length: "
                          f"{len(rows)}, {len(times)}, {len(groups)}")
    times_a = np.asarray(times, dtype=np.float64)
    if np.any(times_a <= 0) or np.any(np.isnan(times_a)):
        raise TuningError("cost model: times must be positive seconds (inf for a failed "
                          f"config), got min {times_a.min() if len(times_a) else None}")
    return times_a


class CostModel:
    """An XGBoost model of config speed; untrained (all-zero scores) until it has 8 records."""

    def __init__(self, objective: str = OBJECTIVES[0], *, rounds: int = ROUNDS,
                 seed: int = 0) -> None:
        if objective not in OBJECTIVES:
            raise TuningError(f"cost model: objective {objective!r} is not one of "
                              f"{list(OBJECTIVES)}")
        self.objective = objective
        self.rounds = rounds
        self.seed = seed
        self.space: FeatureSpace | None = None
        self.scores: dict[str, float] = {}
        self.records = 0
        self._booster: xgb.Booster | None = None

    @property
    def trained(self) -> bool:
        """True once fit on at least MIN_RECORDS records."""
        return self._booster is not None

    def fit(self, rows: Rows, times: Times, groups: Sequence[str]) -> CostModel:
        """(Re)train on all records from scratch; failed configs (time inf) are left out."""
        times_a = _check_records(rows, times, groups)
        keep = np.flatnonzero(np.isfinite(times_a)).tolist()
        self.records = len(keep)
        if len(keep) < MIN_RECORDS:
            self.space, self._booster = None, None
            return self
        kept_rows = [rows[i] for i in keep]
        space = FeatureSpace.fit(kept_rows)
        x, log_t = space.matrix(kept_rows), np.log(times_a[keep])
        if self.objective == "rank:pairwise":
            ids = {g: i for i, g in enumerate(dict.fromkeys(groups[i] for i in keep))}
            qid = np.array([ids[groups[i]] for i in keep])
            order = np.argsort(qid, kind="stable")  # xgboost wants each query contiguous
            data = xgb.DMatrix(x[order], label=-log_t[order], qid=qid[order])
            params = PARAMS | RANK_PARAMS
        else:
            data, params = xgb.DMatrix(x, label=log_t), dict(PARAMS)
        params |= {"objective": self.objective, "seed": self.seed}
        self._booster = xgb.train(params, data, num_boost_round=self.rounds)
        self.space = space
        return self

    def predict(self, rows: Rows) -> np.ndarray:
        """Scores of `rows`, higher = predicted faster (-log time for regression); 0 untrained."""
        if self._booster is None or self.space is None or not rows:
            return np.zeros(len(rows), dtype=np.float64)
        out = self._booster.inplace_predict(self.space.matrix(rows))
        out = np.asarray(out, dtype=np.float64)
        return -out if self.objective == "reg:squarederror" else out

    def ranking_quality(self, rows: Rows, times: Times, groups: Sequence[str]) -> float:
        """Top-10% recall of this model's ranking, averaged over groups (see the module doc)."""
        _check_records(rows, times, groups)
        return top_k_recall(self.predict(rows), times, groups)

    def save(self, path: str | Path) -> None:
        """Write the model into directory `path`: model.json, features.json, meta.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "objective": self.objective, "rounds": self.rounds,
                "seed": self.seed, "scores": self.scores, "records": self.records,
                "trained": self.trained}
        if self._booster is not None and self.space is not None:
            self._booster.save_model(str(path / "model.json"))
            (path / "features.json").write_text(self.space.to_json())
        (path / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """The model `save` wrote to `path`; TuningError when it is missing or unreadable."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("format") != FORMAT:
                raise TuningError(f"cost model {path}: format {meta.get('format')!r}, expected "
                                  f"{FORMAT}; retrain the model")
            model = cls(meta["objective"], rounds=int(meta["rounds"]), seed=int(meta["seed"]))
            model.scores = {str(k): float(v) for k, v in meta["scores"].items()}
            model.records = int(meta["records"])
            if meta["trained"]:
                model.space = FeatureSpace.from_json((path / "features.json").read_text())
                booster = xgb.Booster()
                booster.load_model(str(path / "model.json"))
                booster.set_param({"nthread": PARAMS["nthread"]})
                model._booster = booster
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                xgb.core.XGBoostError) as exc:
            raise TuningError(f"cost model {path}: cannot load ({type(exc).__name__}: "
                              f"{exc}); delete it to retrain") from None
        return model

    def __repr__(self) -> str:
        state = f"trained on {self.records}" if self.trained else "untrained"
        return f"CostModel({self.objective}, {state}, scores={self.scores})"


def _holdout_split(groups: Sequence[str], seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) record indices: ~30% of each group's records held out, by seed."""
    rng = np.random.default_rng(seed)
    groups_a = np.asarray(groups, dtype=object)
    train, held = [], []
    for group in sorted(set(groups)):
        idx = rng.permutation(np.flatnonzero(groups_a == group))
        cut = math.floor(len(idx) * HOLDOUT_FRACTION)
        held += idx[:cut].tolist()
        train += idx[cut:].tolist()
    return sorted(train), sorted(held)


def select_objective(rows: Rows, times: Sequence[float], groups: Sequence[str],
                     seed: int = 0) -> CostModel:
    """The objective that ranks held-out records better, refit on all; scores on `.scores`."""
    times_a = _check_records(rows, times, groups)
    finite = [i for i in range(len(rows)) if math.isfinite(times_a[i])]
    train, held = _holdout_split([groups[i] for i in finite], seed)
    train, held = [finite[i] for i in train], [finite[i] for i in held]
    held_groups = [groups[i] for i in held]
    comparable = any(held_groups.count(g) >= 2 for g in set(held_groups))
    scores: dict[str, float] = {}
    if len(train) >= MIN_RECORDS and comparable:
        for objective in OBJECTIVES:
            model = CostModel(objective, seed=seed).fit(
                [rows[i] for i in train], times_a[train], [groups[i] for i in train])
            scores[objective] = model.ranking_quality(
                [rows[i] for i in held], times_a[held], held_groups)
    best = max(OBJECTIVES, key=lambda o: scores.get(o, 0.0))
    model = CostModel(best, seed=seed).fit(rows, times_a, groups)
    model.scores = scores
    return model
