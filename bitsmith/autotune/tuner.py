"""The tuner: picks each kernel's config by measuring, guided by a cost model.

Kernels are grouped into tasks: identical kernels (same canonical text, template, template
version and knob space) are one task, however many times and in however many models they occur.
A task whose tuned result is in the artifact cache for this device is not tuned again. For the
rest, the task scheduler picks a task per round, the evolutionary search proposes a batch of
configs scored by the cost model (the template's default config goes first), the runner
measures them, every record goes to the tuning database, and the cost model is refit on all of
this device's records. When the budget is spent, each task's winner (fastest median; ties within
the noise band broken by config hash) goes to the cache with its compiled kernel.

The cost model learns from every measurement this device has made, not only this run's: each
refit adds the newest measurements of earlier tasks (the database remembers each task's template
and problem sizes), and a run whose device has history fits the model before its first round,
so a new task starts from what other kernels taught it. The model is also saved per device and
loaded at the start of the next run, for a cache whose database is gone.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..codegen.template import TEMPLATES, Config, KernelTemplate, Problem, Target
from ..errors import TuningError
from ..ir.dialects.kernel import FusedOp
from ..ir.packing import stored_nbytes
from ..ir.types import evaluate_dim
from .cache import ArtifactCache, CacheEntry, cache_dir, cache_key, canonical_json, parse_age
from .candidates import MeasureInput, MeasureResult, Runner, kernel_text
from .cost_model import MIN_RECORDS, CostModel, select_objective
from .database import Record, TuningDatabase, default_database_path
from .features import features
from .fingerprint import device_descriptors, device_fingerprint, fingerprint_hash
from .scheduler import TaskScheduler, TaskState
from .search import SearchOptions, evolutionary_search, neighbours, random_search


@dataclass(frozen=True)
class Budget:
    """How much to tune: a number of measured configs, or wall-clock seconds."""

    trials: int | None = None
    seconds: float | None = None

    @staticmethod
    def parse(value: int | str | Budget) -> Budget:
        """200 -> 200 trials; "10m", "90s", "1h" -> seconds."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TuningError(f"tune budget expected trials (an int) or a time like '10m', "
                              f"got {value!r}")
        if isinstance(value, int) or value.strip().isdigit():
            trials = int(value)
            if trials < 1:
                raise TuningError(f"tune budget expected at least 1 trial, got {trials}")
            return Budget(trials=trials)
        try:
            return Budget(seconds=parse_age(value))
        except TuningError as exc:
            raise TuningError(f"tune budget: {exc}") from None

    def spent(self, trials: int, seconds: float) -> bool:
        """True once the budget is used up."""
        return ((self.trials is not None and trials >= self.trials)
                or (self.seconds is not None and seconds >= self.seconds))


@dataclass
class Task:
    """Identical kernels, tuned once."""

    key: str
    kernel_ir: str
    template: KernelTemplate
    problem: Problem
    timing: str = "cold"  # "hot": timed on one copy of its operands (see `timing_regime`)
    kernels: list[FusedOp] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A readable name: the first kernel's."""
        return self.kernels[0].kernel_name


def task_key(kernel_ir: str, template: KernelTemplate, timing: str = "cold") -> str:
    """The database key of a task: kernel text, template, version, knob space and timing."""
    payload = canonical_json({"kernel_ir": kernel_ir, "template": template.name,
                              "version": template.version, "space": template.space.to_json(),
                              "timing": timing})
    return hashlib.sha256(payload.encode()).hexdigest()


def select(op: FusedOp, target: Target) -> tuple[KernelTemplate, Problem]:
    """The template a kernel builds with on `target`: Triton's on cuda, TVM's on the CPU."""
    if target.kind == "cuda":
        from ..codegen.triton.templates import select as select_gpu  # noqa: PLC0415
        return select_gpu(op, target)
    from ..codegen.tvm.templates import select as select_cpu  # noqa: PLC0415 - needs TVM
    return select_cpu(op, target)


def backend_of(template_name: str) -> str:
    """"cuda" for the Triton templates, "llvm" for TVM's."""
    return "cuda" if template_name.startswith("triton.") else "llvm"


def default_runner(target: Target) -> Runner:
    """Where candidates are measured: a worker pool on the CPU, this process on a GPU."""
    if target.kind == "cuda":
        from .measure_triton import TritonRunner  # noqa: PLC0415
        return TritonRunner(target)
    from .measure import LocalRunner  # noqa: PLC0415 - needs TVM
    return LocalRunner()


def group_tasks(kernels: Iterable[FusedOp], target: Target, timing: str = "cold") -> list[Task]:
    """Kernels grouped into tasks, in first-seen order."""
    if timing not in ("hot", "cold"):
        raise TuningError(f"timing expected 'hot' or 'cold', got {timing!r}")
    tasks: dict[str, Task] = {}
    for op in kernels:
        template, problem = select(op, target)
        text = kernel_text(op)
        key = task_key(text, template, timing)
        if key not in tasks:
            tasks[key] = Task(key, text, template, problem, timing)
        tasks[key].kernels.append(op)
    return list(tasks.values())


def working_set(kernels: Iterable[FusedOp], bindings: Mapping[str, int]) -> int:
    """Bytes of every distinct value the kernels read or write (weights once), at `bindings`
    for the symbolic dims: an upper bound on what a run of the model touches."""
    seen: dict[int, int] = {}
    for op in kernels:
        for value in [*op.operands, *op.results]:
            subs = {s: bindings.get(s.name, 1) for s in value.type.symbols}
            shape = tuple(evaluate_dim(d, subs) for d in value.type.shape)
            seen[id(value)] = stored_nbytes(value.type, shape)
    return sum(seen.values())


def timing_regime(kernels: Sequence[FusedOp], bindings: Mapping[str, int],
                  fingerprint: Mapping[str, Any]) -> str:
    """'hot' when the kernels' working set fits in the last-level cache (the model runs with
    its weights and activations cached, so its kernels are timed on a hot cache), else 'cold'.
    An unknown cache size counts as too small."""
    llc = max(dict(fingerprint.get("cache", {})).values(), default=0)
    return "hot" if 0 < working_set(kernels, bindings) <= llc else "cold"


def config_json(config: Mapping[str, Any]) -> str:
    """The canonical JSON of a config (database and cache form)."""
    return canonical_json(dict(config))


HISTORY = 1000
"""At most this many measurements of earlier tasks (the newest) join each refit: enough to carry
what other kernels taught the model, few enough that a refit takes about a second."""
RESELECT_GROWTH = 1.5
"""Both objectives are tried again once the records have grown by this factor since the last
choice; in between, a refit trains only the kept objective (a third of the work)."""


class Tuner:
    """Tunes kernels on this machine; remembers everything in the database and the cache."""

    def __init__(self, *, target: Target | None = None, database: TuningDatabase | None = None,
                 cache: ArtifactCache | None = None, runner: Runner | None = None,
                 bindings: Mapping[str, int] | None = None, batch: int = 8, seed: int = 0,
                 search: str = "model", progress: bool = False,
                 timing: str | None = None,
                 transfer: Sequence[Mapping[str, Any]] = ()) -> None:
        if search not in ("model", "random"):
            raise TuningError(f"search expected 'model' or 'random', got {search!r}")
        if timing not in (None, "hot", "cold"):
            raise TuningError(f"timing expected 'hot', 'cold' or None, got {timing!r}")
        self.timing = timing  # None: the regime of the kernels each call is given
        if target is None:
            from ..codegen.tvm.target import host_target  # noqa: PLC0415 - needs TVM
            target = host_target()
        self.target = target
        self._target_text = ""  # the host's CPU: the workers' own target
        if target.kind == "llvm":
            from ..codegen.tvm.target import host_target, target_json  # noqa: PLC0415
            self._target_text = "" if target == host_target() else target_json(target)
        self.fingerprint = device_fingerprint(self.target)
        self.fp = fingerprint_hash(self.fingerprint)
        self.descriptors = device_descriptors(self.fingerprint)
        # other devices (their fingerprints) whose measurements also train the cost model
        self.transfer = [(fingerprint_hash(fp), device_descriptors(fp)) for fp in transfer
                         if fingerprint_hash(fp) != self.fp]
        self.database = database or TuningDatabase(default_database_path())
        self.cache = cache or ArtifactCache()
        self._runner = runner
        self.bindings = dict(bindings or {"B": 8})
        self.batch = batch
        self.rng = random.Random(seed)
        self.search = search
        self.progress = progress
        self.model_path = cache_dir() / "models" / self.fp
        self.model = self._load_model()
        self.libraries: dict[tuple[str, str], bytes] = {}
        self._tasks: dict[str, Task] = {}
        self._history: list[tuple[dict[str, float], float, str]] = []
        self._selected_at = 0  # records when the objective was last chosen
        self._rows: dict[tuple[str, str], dict[str, float]] = {}  # features by (task, config)

    @property
    def runner(self) -> Runner:
        """The measurement runner (a local worker pool unless one was given)."""
        if self._runner is None:
            self._runner = default_runner(self.target)
        return self._runner

    def close(self) -> None:
        """Stop workers (the database stays open for the caller that passed it)."""
        if self._runner is not None:
            self._runner.close()

    def cache_key(self, task: Task) -> str:
        """The artifact-cache key of a task on this device."""
        return cache_key(task.kernel_ir, task.template.name, task.template.version,
                         task.template.space.to_json(), self.fingerprint, task.timing)

    def tasks(self, kernels: Sequence[FusedOp]) -> list[Task]:
        """Kernels grouped into tasks, timed as `self.timing` says, or else hot if these
        kernels together fit in the last-level cache (`timing_regime`). Give a tuner a model's
        regime when it is handed only some of the model's kernels."""
        kernels = list(kernels)
        return group_tasks(kernels, self.target, self.timing or
                           timing_regime(kernels, self.bindings, self.fingerprint))

    def cached_configs(self, kernels: Sequence[FusedOp]) -> dict[str, Config]:
        """Configs of the kernels whose tuned result is cached for this device, by name.

        A missing or corrupt cache entry whose task the database has measured is rebuilt from
        the database's winner, without measuring.
        """
        out = {}
        for task in self.tasks(kernels):
            entry = self.cache.get(self.cache_key(task))
            if entry is None and self.database.best(task.key, self.fp) is not None:
                self._cache_winner(task)
                entry = self.cache.get(self.cache_key(task))
            if entry is not None:
                for op in task.kernels:
                    out[op.kernel_name] = Config(json.loads(entry.config))
        return out

    def tune(self, kernels: Sequence[FusedOp], budget: int | str | Budget) -> dict[str, Config]:
        """Tune every kernel not cached for this device; the chosen config of each kernel."""
        budget = Budget.parse(budget)
        # a template without knobs has one config: nothing to measure (nor, for kernels that
        # take page tables, inputs a random draw could make valid)
        tasks = [t for t in self.tasks(kernels) if t.template.space.knobs
                 and self.cache.get(self.cache_key(t)) is None]
        if tasks:
            self._run(tasks, budget)
            for task in tasks:
                self._cache_winner(task)
        return self.cached_configs(kernels)

    # ---- the tuning loop ----------------------------------------------------------------
    def _run(self, tasks: list[Task], budget: Budget) -> None:
        by_key = self._tasks = {t.key: t for t in tasks}
        for task in tasks:
            self.database.add_task(task.key, task.template.name, task.template.version,
                                   task.problem.params)
        versions = {name: t.version for name, t in TEMPLATES.items()
                    if backend_of(name) == self.target.kind}
        self._history = [
            (features(template, problem, Config(json.loads(config)), self.descriptors), median,
             key)
            for key, template, problem, config, median
            in self.database.history(self.fp, versions, HISTORY, exclude=by_key)]
        for fp, descriptors in self.transfer:  # every task, these ones too, on other devices
            self._history += [
                (features(template, problem, Config(json.loads(config)), descriptors), median,
                 f"{key}@{fp}")
                for key, template, problem, config, median
                in self.database.history(fp, versions, HISTORY)]
        if self._history:  # earlier tasks on this device train the model the first round uses
            self._refit()
        scheduler = TaskScheduler([TaskState(t.key, len(t.kernels)) for t in tasks])
        for task in tasks:  # what earlier runs measured counts
            best = self.database.best(task.key, self.fp)
            if best is not None and best.median is not None:
                n = len(self.database.records(task.key, self.fp))
                scheduler.update(task.key, best.median, n)
        start, trials = time.perf_counter(), 0
        columns = (TextColumn("[bold]tuning"), BarColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn())
        total = budget.trials if budget.trials is not None else budget.seconds
        with Progress(*columns, disable=not self.progress, transient=True) as bar:
            handle = bar.add_task("", total=total)
            while not budget.spent(trials, time.perf_counter() - start):
                state = scheduler.next()
                if state is None:
                    break
                task = by_key[state.key]
                room = self.batch
                if budget.trials is not None:
                    room = min(room, budget.trials - trials)
                    if state.trials == 0:  # a first round for every task fits the budget
                        unseen = sum(1 for t in scheduler.tasks.values() if t.trials == 0)
                        room = max(1, min(room, (budget.trials - trials) // unseen))
                results, configs = self._round(task, room)
                trials += len(configs)
                best = min((r.median for r in results), default=math.inf)
                scheduler.update(task.key, best, len(configs), exhausted=not configs)
                bar.update(handle, completed=trials if budget.trials is not None
                           else time.perf_counter() - start,
                           description=f"{trials} trials, {task.name} best "
                                       f"{scheduler.tasks[task.key].best * 1e6:.1f} us, model "
                                       f"~{scheduler.estimated_total() * 1e3:.2f} ms")
                if configs:
                    self._refit()

    def _round(self, task: Task, room: int) -> tuple[list[MeasureResult], list[Config]]:
        measured = self.database.records(task.key, self.fp)
        done = [(Config(json.loads(r.config)), r.median if r.median is not None else math.inf)
                for r in measured]
        configs: list[Config] = []
        default = task.template.default_config(task.problem, self.target)
        if default not in {c for c, _ in done}:
            configs.append(default)
        if self.search == "random":
            configs += random_search(task.template, task.problem,
                                     [c for c, _ in done] + configs, room - len(configs),
                                     self.rng)
        elif not self.model.trained:  # no model yet: the default's neighbours, then random
            seen = {c for c, _ in done} | set(configs)
            near = [n for n in neighbours(task.template, default)
                    if n not in seen and task.template.valid(task.problem, n)]
            self.rng.shuffle(near)
            configs += near[:room - len(configs)]
            configs += random_search(task.template, task.problem, list(seen) + configs,
                                     room - len(configs), self.rng)
        else:
            configs += [c for c in evolutionary_search(
                task.template, task.problem, lambda cs: self._score(task, cs),
                done + [(c, math.inf) for c in configs], room, self.rng, SearchOptions())
                if c not in configs][:room - len(configs)]
        configs = configs[:room]
        if not configs:
            return [], []
        bindings = tuple(sorted(self.bindings.items()))
        inputs = [MeasureInput(task.kernel_ir, task.template.name, config_json(c), bindings,
                               hot=task.timing == "hot", target=self._target_text)
                  for c in configs]
        results = self.runner.run(inputs)
        records = []
        for config, result in zip(configs, results, strict=True):
            text = config_json(config)
            if result.ok:
                records.append(Record.measured(task.key, self.fp, task.template.name, text,
                                               result.times))
                self.libraries[(task.key, text)] = result.library
            else:
                records.append(Record.failed(task.key, self.fp, task.template.name, text,
                                             result.error or "unknown failure"))
        self.database.add_many(records)
        return results, configs

    def _score(self, task: Task, configs: Sequence[Config]) -> Any:
        rows = [features(task.template.name, task.problem.params, c, self.descriptors)
                for c in configs]
        return self.model.predict(rows)

    def _refit(self) -> None:
        """Refit the cost model on every successful record of this run's tasks and the newest
        records of earlier tasks on this device."""
        rows = [row for row, _, _ in self._history]
        times = [median for _, median, _ in self._history]
        groups = [key for _, _, key in self._history]
        for key, task in self._tasks.items():
            for record in self.database.records(key, self.fp):
                if record.median is None:
                    continue
                row = self._rows.get((key, record.config))
                if row is None:
                    row = self._rows[(key, record.config)] = features(
                        task.template.name, task.problem.params,
                        Config(json.loads(record.config)), self.descriptors)
                rows.append(row)
                times.append(record.median)
                groups.append(key)
        if len(rows) >= MIN_RECORDS:  # both objectives tried, the better ranking kept
            if len(rows) >= self._selected_at * RESELECT_GROWTH:
                self.model = select_objective(rows, times, groups)
                self._selected_at = len(rows)
            else:
                scores = self.model.scores
                self.model = CostModel(self.model.objective).fit(rows, times, groups)
                self.model.scores = scores
            self.model.save(self.model_path)

    def _load_model(self) -> CostModel:
        try:
            return CostModel.load(self.model_path) if self.model_path.exists() else \
                CostModel("rank:pairwise")
        except TuningError:  # an unreadable saved model is replaced by a fresh one
            return CostModel("rank:pairwise")

    def keep_default(self, kernels: Sequence[FusedOp], reason: str) -> None:
        """Cache the template's default config for these kernels (their tuned winner lost in
        the model), so that later compiles use the default without measuring again."""
        for task in self.tasks(kernels):
            default = task.template.default_config(task.problem, self.target)
            self.cache.put(CacheEntry(
                key=self.cache_key(task), template=task.template.name,
                config=config_json(default), median=None, times=(), library=b"",
                meta={"fingerprint_hash": self.fp, "kernel": task.name, "task_key": task.key,
                      "created": time.time(), "kept_default": reason}))

    def _cache_winner(self, task: Task) -> None:
        best = self.database.best(task.key, self.fp)
        if best is None:
            return
        library = self.libraries.get((task.key, best.config), b"")
        self.cache.put(CacheEntry(
            key=self.cache_key(task), template=task.template.name, config=best.config,
            median=best.median, times=best.times or (), library=library,
            meta={"fingerprint_hash": self.fp, "kernel": task.name, "task_key": task.key,
                  "created": time.time(), "trials": len(self.database.records(task.key,
                                                                              self.fp))}))

