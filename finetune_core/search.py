"""run_search(): an Optuna study around run_training(); one trial = one isolated run, one after another.

Each trial trains its own run folder in a child process (isolated.py), so memory is returned between
trials, and reports every validation evaluation; the pruner compares it with earlier trials at the
same evaluation, and a pruned trial stops at its next step. The study lives in a database (an
SQLAlchemy URL: SQLite here, PostgreSQL the same way), so a killed search resumes where it was.

Outputs in the search folder:
  search.json    every trial (number, params, value, state, run folder), the best, parameter importances
  best/          a copy of the best trial's run folder: export, evaluate or serve it like any run
  trials/NNN/    each trial's run folder (without checkpoints: a trial is never resumed)
  plots/         optimization_history.png, param_importances.png
  events.jsonl   trial_start, trial_end and search_end events
  search.db      the study, unless another storage is given

Resuming: run the same search into the same folder (or study) again. Finished trials are kept; a
trial that a kill interrupted is marked failed and its parameters run again as a new trial; the
search ends when `trials` trials have completed or been pruned. One search per study at a time: a
running trial found at the start is taken to be a dead search's.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import LOWER_IS_BETTER, JobConfig
from .errors import ConfigError, DataError, FinetuneError
from .isolated import RunCrashed, run_isolated
from .plots import plot_importances, plot_search_history
from .search_space import Choice, Range, SearchSpec, apply_params

EventFn = Callable[[dict], None]
STUDY_DB = "search.db"
# Optuna's TPE samples at random for its first 10 trials, the whole of a 10-trial search; a third of
# the budget (2 to 10 trials) explores before the model of good and bad regions takes over.
TPE_STARTUP_SHARE = 3
# The median pruner judges a trial against the median of at least this many finished ones (Optuna's
# default 5 would leave half of a 10-trial search unprunable).
MEDIAN_STARTUP_TRIALS = 2


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str  # complete | pruned | failed | running | waiting
    params: dict
    value: float | None  # the metric; for a pruned trial, its last evaluation's
    run_dir: str | None  # relative to the search folder
    error: str | None = None

    def brief(self) -> dict:
        return {"number": self.number, "params": self.params, "value": self.value}


@dataclass(frozen=True)
class SearchSummary:
    """What search.json holds; the one writer of that file is run_search."""

    study: str
    storage: str  # without a password
    metric: str
    direction: str
    sampler: str
    pruner: str
    status: str  # running | completed | timed_out | cancelled
    trials_target: int
    trials: list[TrialRecord]
    best: TrialRecord | None
    importances: dict[str, float] | None
    importances_note: str | None  # why there are none

    @property
    def trials_done(self) -> int:
        return sum(t.state in ("complete", "pruned") for t in self.trials)

    def to_dict(self) -> dict:
        best = None if self.best is None else {**asdict(self.best), "run_dir": "best", "trial_run_dir": self.best.run_dir}
        return {**asdict(self), "trials_done": self.trials_done, "best": best}


def run_search(cfg: JobConfig, spec: SearchSpec, output: str | Path, *, storage: str | None = None,
               study_name: str = "search", on_event: EventFn | None = None,
               should_stop: Callable[[], bool] = lambda: False) -> SearchSummary:
    """Run (or resume) the study and write the search folder; returns what search.json holds.

    on_event receives the search's events and every trial's training events (with "trial": number).
    storage: an SQLAlchemy URL; default `sqlite:///OUTPUT/search.db`.
    """
    import optuna

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # Our trial_end events replace Optuna's per-trial lines, and a failed trial's error is in them (Optuna's
    # warning would add a traceback to a one-line error).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = storage or f"sqlite:///{(output / STUDY_DB).resolve()}"
    study, storage = _open_study(url, study_name, cfg, spec)
    target = min(spec.trials, spec.grid_size) if spec.sampler == "grid" else spec.trials
    log = _SearchLog(output, on_event, spec.metric, target)
    for number in _retry_interrupted(study, storage):
        log.trial_end(study, study.trials[number])

    def after_trial(study, trial) -> None:
        log.trial_end(study, trial)
        _write_outputs(_summary(study, spec, url, "running", target), output)  # search.json and plots as it goes

    try:
        status, started = "completed", time.monotonic()
        try:
            remaining = target - _done(study)
            if remaining > 0:
                study.optimize(_Objective(cfg, spec, output, log, should_stop, target), n_trials=remaining,
                               timeout=spec.timeout_s, catch=(_TrialFailed,), callbacks=[after_trial])
        except _Stopped as stopped:
            status = "cancelled"
            log.trial_end(study, study.trials[stopped.number])
        if status == "completed" and _done(study) < target and spec.timeout_s and time.monotonic() - started >= spec.timeout_s:
            status = "timed_out"
        summary = _summary(study, spec, url, status, target)
        _write_outputs(summary, output, copy_best=True)
        log({"type": "search_end", "status": status, "trials_done": summary.trials_done,
             "best": summary.best and summary.best.brief()})
    finally:
        log.close()
    if summary.best is None and status != "cancelled":
        failed = [t for t in summary.trials if t.error]
        first = f"; trial {failed[0].number}: {failed[0].error}" if failed else ""
        raise FinetuneError(f"search: no trial completed ({summary.trials_done} pruned, {len(failed)} failed){first}")
    return summary


def direction(metric_name: str) -> str:
    return "minimize" if metric_name in LOWER_IS_BETTER else "maximize"


class _TrialFailed(Exception):
    """One trial failed (a crash, or a value its model refused); the search goes on without it."""


class _Stopped(Exception):
    """The search was asked to stop (cancel, SIGTERM): the running trial stopped and runs again on resume."""

    def __init__(self, number: int):
        super().__init__(f"trial {number} stopped")
        self.number = number


class _Objective:
    def __init__(self, cfg: JobConfig, spec: SearchSpec, output: Path, log: _SearchLog, should_stop: Callable[[], bool],
                 target: int):
        self.cfg, self.spec, self.output, self.log, self.should_stop, self.target = cfg, spec, output, log, should_stop, target

    def __call__(self, trial) -> float:
        import optuna

        params = {p.name: _suggest(trial, p) for p in self.spec.space}
        run_dir = f"trials/{trial.number:03d}"
        trial.set_user_attr("run_dir", run_dir)
        self.log({"type": "trial_start", "number": trial.number, "params": params, "run_dir": run_dir,
                  "trials_done": _done(trial.study), "trials": self.target})
        evaluations, pruned = 0, False

        def on_event(event: dict) -> None:
            nonlocal evaluations, pruned
            self.log.forward({**event, "trial": trial.number})
            if event["type"] == "eval":
                evaluations += 1
                # The step is the evaluation's ordinal: trials with other batch sizes take other numbers
                # of optimizer steps, but their n-th evaluations come at the same point of training.
                trial.report(event["metrics"][self.spec.metric_name], evaluations)
                pruned = pruned or trial.should_prune()

        try:
            metrics = run_isolated(apply_params(self.cfg, params), self.output / run_dir, on_event=on_event,
                                   should_stop=lambda: pruned or self.should_stop())
        except DataError:
            raise  # the same data for every trial: the search cannot go on
        except (FinetuneError, RunCrashed) as err:
            trial.set_user_attr("error", str(err))
            raise _TrialFailed(str(err)) from None
        except KeyboardInterrupt:
            _retry_later(trial.study, trial.number, params)
            raise
        finally:
            shutil.rmtree(self.output / run_dir / "checkpoints", ignore_errors=True)
        if metrics["train"]["status"] == "cancelled":
            if pruned:
                raise optuna.TrialPruned(f"pruned after evaluation {evaluations}")
            trial.set_user_attr("error", "interrupted: the search was stopped; it runs again when the search resumes")
            _retry_later(trial.study, trial.number, params)
            raise _Stopped(trial.number)
        return metrics["validation"][self.spec.metric_name]


def _suggest(trial, param: Range | Choice):
    if isinstance(param, Choice):
        return trial.suggest_categorical(param.name, list(param.values))
    if param.integer:
        return trial.suggest_int(param.name, param.low, param.high, log=param.log)
    return trial.suggest_float(param.name, param.low, param.high, log=param.log)


def _open_study(url: str, name: str, cfg: JobConfig, spec: SearchSpec) -> tuple:
    """The study (created, or loaded when its settings match) and its storage."""
    import optuna

    # SQLite: wait for a lock as long as the job store does (the service shares its database).
    engine = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
    seed = cfg.train.seed
    if spec.sampler == "grid":
        sampler = optuna.samplers.GridSampler({p.name: list(p.values) for p in spec.space}, seed=seed)
    elif spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.trials // TPE_STARTUP_SHARE)))
    if spec.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    elif spec.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    else:
        pruner = optuna.pruners.NopPruner()
    # What must match for a resumed study to mean the same thing: trials and timeout may change, and so
    # may the CPU threads (the service sets them from the machine's cores).
    config = cfg.to_dict()
    config["train"]["num_threads"] = None
    setup = json.loads(json.dumps({"config": config, **spec.to_dict(), "trials": None, "timeout_s": None}))
    where = f"study '{name}' in {_safe_url(url)}"
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction(spec.metric_name),
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
    except ValueError as err:  # an existing study optimised the other way
        raise ConfigError(f"search: the {where} cannot be resumed with metric {spec.metric}: {err}") from None
    known = study.user_attrs.get("setup")
    if known is None:
        study.set_user_attr("setup", setup)
    elif known != setup:
        key, then, now = _first_difference(known, setup)
        raise ConfigError(f"search: the {where} was started with other settings ({key}: {then!r} then, {now!r} now); "
                          "run it again with the same settings to resume it, or use a new output folder or study")
    return study, storage


def _retry_interrupted(study, storage) -> list[int]:
    """A trial still running belongs to a search that was killed: fail it and run its parameters again.

    Returns the numbers of the trials it failed.
    """
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    interrupted = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in interrupted:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "error", "interrupted: the search process died; run again as a new trial")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        _retry_later(study, trial.number, trial.params)
    return [trial.number for trial in interrupted]


def _retry_later(study, number: int, params: dict) -> None:
    # A new trial with the same values, run before any newly sampled one (a grid counts the failed
    # point as visited, so without this it would never be measured).
    study.enqueue_trial(params, user_attrs={"retry_of": number})


def _done(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _record(trial) -> TrialRecord:
    state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(trial.state.name, trial.state.name.lower())
    value = trial.value
    if value is None and trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
    return TrialRecord(trial.number, state, dict(trial.params), value, trial.user_attrs.get("run_dir"),
                       trial.user_attrs.get("error"))


def _summary(study, spec: SearchSpec, url: str, status: str, target: int) -> SearchSummary:
    """What search.json holds; parameter importances only once the search has ended (status not running)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = _record(study.best_trial) if complete else None
    importances, note = None, None
    if status == "running":
        # optuna.importance imports scikit-learn (+190 MB measured), which the search process would then
        # hold while every later trial trains beside it; the figures are worth reading at the end anyway.
        note = "computed when the search ends"
    elif len(complete) < 2:
        note = f"fewer than 2 complete trials ({len(complete)}): no parameter importances"
    else:
        import optuna

        try:
            with warnings.catch_warnings():  # "quantiles select the same set of trials": said in the figures
                warnings.simplefilter("ignore")
                found = optuna.importance.get_param_importances(study)
            importances = {k: round(v, 4) for k, v in found.items()}
        except (ValueError, RuntimeError) as err:  # e.g. every complete trial had the same values
            note = f"parameter importances could not be computed: {err}"
    return SearchSummary(study.study_name, _safe_url(url), spec.metric, direction(spec.metric_name), spec.sampler,
                         spec.pruner, status, target, [_record(t) for t in study.trials], best, importances, note)


def _write_outputs(summary: SearchSummary, output: Path, copy_best: bool = False) -> None:
    best = output / "best"
    if copy_best and summary.best is not None:
        if best.exists():
            shutil.rmtree(best)
        shutil.copytree(output / summary.best.run_dir, best)
    plots = output / "plots"
    plots.mkdir(exist_ok=True)
    plot_search_history(summary.trials, summary.direction, summary.metric, plots / "optimization_history.png")
    if summary.importances:
        plot_importances(summary.importances, plots / "param_importances.png")
    else:
        (plots / "param_importances.png").unlink(missing_ok=True)
    (output / "search.json").write_text(json.dumps(summary.to_dict(), indent=2))


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _first_difference(then, now, key: str = "") -> tuple[str, object, object]:
    if isinstance(then, dict) and isinstance(now, dict):
        for name in sorted(set(then) | set(now)):
            if then.get(name) != now.get(name):
                return _first_difference(then.get(name), now.get(name), f"{key}.{name}" if key else name)
    return key, then, now


class _SearchLog:
    """Writes the search's own events to events.jsonl and forwards them, and the trials' events, to on_event."""

    def __init__(self, output: Path, forward: EventFn | None, metric: str, target: int):
        self.file = (output / "events.jsonl").open("a")
        self.forward = forward or (lambda event: None)
        self.metric, self.target = metric, target

    def __call__(self, event: dict) -> None:
        event = {"time": round(time.time(), 3), **event}
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        self.forward(event)

    def trial_end(self, study, trial) -> None:
        record = _record(trial)
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        self({"type": "trial_end", "number": record.number, "params": record.params, "state": record.state,
              "metric": self.metric, "value": record.value, "error": record.error, "trials_done": _done(study),
              "trials": self.target, "best": _record(study.best_trial).brief() if complete else None})

    def close(self) -> None:
        self.file.close()
