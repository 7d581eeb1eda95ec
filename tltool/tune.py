"""`tltool tune`: a hyperparameter sweep with Optuna, every trial a normal tltool run.

The search space is `KEY=DIST` items (`train.lr=loguniform(1e-5,1e-1)`, `uniform(a,b)`, `int(a,b)`,
`choice(a,b,...)`), from the command line or a YAML file; every key is a config key and every range is
checked by the config model before the first trial. Optuna owns the search: a TPE sampler seeded from
`run.seed`, a median pruner fed each epoch's value of the metric through `finetune(on_epoch=...)` (a pruned
run stops after that epoch, saved, `stop_reason: pruned`), and the study in `<out>/study.db` (SQLite, Optuna's
RDB storage). Trial N runs in `<out>/trial-000N/`. A second `tltool tune` with the same arguments continues
the sweep: finished trials are kept; a trial that was running when the sweep died is marked failed and its
parameters are run again as a new trial. The sweep directory is locked (runlock.py) while a sweep runs, so
every trial still "running" in the study at the start belongs to a dead process.

At the end: `<out>/best.yaml` (the base config with the best trial's values: `tltool finetune` runs it) and
`history.png` / `parallel_coordinates.png` (optuna.visualization.matplotlib).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tltool.config import (
    CheckpointConfig,
    Config,
    ModelNames,
    all_keys,
    build_config,
    did_you_mean,
    parse_overrides,
)
from tltool.config_yaml import read_yaml
from tltool.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    import optuna

INSTALL = "pip install 'tltool[optuna]'"
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
EXAMPLE = "e.g. train.lr=loguniform(1e-5,1e-1) data.batch_size=int(8,64) train.optimizer=choice(sgd,adamw)"
STUDY_NAME = "tltool-tune"
STUDY_FILE = "study.db"
# Keys a sweep sets itself (each trial's run directory).
RESERVED_KEYS = ("run.output_dir", "run.name")
_DIST = re.compile(r"^\s*(loguniform|uniform|int|choice)\s*\((.*)\)\s*$", re.DOTALL)
_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # 1e-5 (a string to YAML 1.1)


def import_optuna() -> Any:
    """The optuna module, or a one-line ConfigError with the install command."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("tltool tune needs the optuna package, which is not installed", INSTALL) from None
    return optuna


@dataclass(frozen=True)
class Dimension:
    """One key of the search space and its distribution: (low, high) of loguniform/uniform/int, or the choices."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def text(self) -> str:
        return f"{self.kind}({', '.join(_scalar_text(v) for v in self.values)})"

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value of this key (Optuna's sampler picks it; an enqueued trial's is given back)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_float(self.key, *self.values, log=self.kind == "loguniform")

    def probes(self) -> list[Any]:
        """Values the config model must accept for the whole range to be valid: the ends and an inner point."""
        if self.kind == "choice":
            return list(self.values)
        low, high = self.values
        if self.kind == "int":
            return [low, high]
        inner = math.exp(math.log(low) * 0.63 + math.log(high) * 0.37) if self.kind == "loguniform" else None
        return [low, high, inner if inner is not None else low + (high - low) * 0.37]


def _scalar_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").removesuffix(" ...")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _scalar_text(value)


def _scalar(value: Any) -> Any:
    """A YAML scalar, with `1e-5` read as the number YAML 1.2 (and a reader) takes it for."""
    if isinstance(value, str) and _EXPONENT.match(value.strip()):
        return float(value)
    return value


def is_distribution(text: str) -> bool:
    """Whether a command-line item's value is a distribution (`KEY=uniform(...)`), not a fixed override."""
    return bool(_DIST.match(text))


def parse_dimension(key: str, text: str) -> Dimension:
    """`key` and `loguniform(1e-5, 1e-1)` -> Dimension; a one-line ConfigError on bad syntax or an unknown key."""
    item = f"{key}={text}"
    if key not in set(all_keys()):
        raise ConfigError(f"search space key '{key}' is not a config key; {did_you_mean(key)}",
                          "`tltool config keys` lists every key")  # fmt: skip
    if key in RESERVED_KEYS:
        raise ConfigError(f"search space key '{key}': tltool tune sets it for each trial (<out>/trial-N)",
                          "drop it from the search space; --out chooses where the sweep goes")  # fmt: skip
    match = _DIST.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"search space {item!r} is not a distribution", f"write one of {', '.join(DISTRIBUTIONS)}, "
                          f"e.g. {key}=loguniform(1e-5,1e-1) or {key}=choice(a,b)")  # fmt: skip
    kind, inner = match.group(1), match.group(2)
    try:
        values = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError:
        values = None
    if not isinstance(values, list) or not values or any(isinstance(v, list | dict) for v in values):
        raise ConfigError(f"search space {item!r}: the arguments are not a list of YAML scalars",
                          f"e.g. {kind}(0.1, 1)" if kind != "choice" else "e.g. choice(0.01, 0.1, 1)")  # fmt: skip
    values = [_scalar(v) for v in values]
    if kind == "choice":
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"search space {item!r} names a value twice", "list each choice once")
        return Dimension(key, kind, tuple(values))
    if len(values) != 2:
        raise ConfigError(f"search space {item!r}: {kind} takes two numbers, (low, high)", f"e.g. {key}={kind}(1, 8)")
    numbers = int if kind == "int" else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, numbers) or not math.isfinite(v) for v in values):
        what = "integers" if kind == "int" else "finite numbers"
        raise ConfigError(f"search space {item!r}: low and high must be {what}", f"e.g. {key}={kind}(1, 8)")
    low, high = values
    if not low < high:
        raise ConfigError(f"search space {item!r}: low must be below high", f"e.g. {key}={kind}({high}, {low})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search space {item!r}: loguniform needs low > 0", f"e.g. {key}=loguniform(1e-5, 1e-1)")
    if kind != "int":
        low, high = float(low), float(high)
    return Dimension(key, kind, (low, high))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A space file's mapping (dotted keys, or sections of keys) as dotted key -> distribution text."""
    if not isinstance(data, dict):
        return {prefix.removesuffix("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def read_space_file(path: str | Path) -> dict[str, str]:
    """A YAML file of `key: dist(...)` lines (or `section: {key: dist(...)}`) -> dotted key -> text."""
    data = read_yaml(path)  # (a missing file, bad YAML: one ConfigError line)
    return {key: value for key, value in _flatten(data).items()}


def split_arguments(items: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Command-line items -> (KEY=DIST items of the space, KEY=VALUE fixed overrides of the base config)."""
    space: dict[str, str] = {}
    fixed: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and is_distribution(value):
            space[key.strip()] = value
        else:
            fixed.append(item)
    return space, fixed


def parse_space(items: Sequence[str], space_file: str | None = None) -> tuple[list[Dimension], list[str]]:
    """The search space (the file's keys, then the command line's, which win) and the fixed overrides."""
    texts = read_space_file(space_file) if space_file is not None else {}
    given, fixed = split_arguments(items)
    texts.update(given)
    dimensions = [parse_dimension(key, text if isinstance(text, str) else repr(text)) for key, text in texts.items()]
    if not dimensions:
        raise ConfigError("the search space is empty", f"give KEY=DIST items or --space FILE ({EXAMPLE})")
    return dimensions, fixed


def _nested(values: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass(frozen=True)
class BaseConfig:
    """The sweep's base: the config file's data with the fixed overrides, and how to build a trial's config."""

    data: dict[str, Any]
    source: str
    names: ModelNames | None

    def config(self, values: dict[str, Any] | None = None) -> Config:
        """The base config with `values` (dotted key -> value) set, validated (every problem in one ConfigError)."""
        return build_config(_merged(self.data, _nested(values or {})), source=self.source, names=self.names)


def load_base(config_path: str | None, fixed: Sequence[str], names: ModelNames | None) -> tuple[BaseConfig, Config]:
    data = read_yaml(config_path) if config_path is not None else {}
    base = BaseConfig(_merged(data, parse_overrides(fixed)), str(config_path or "config"), names)
    return base, base.config()


def check_space(base: BaseConfig, dimensions: Sequence[Dimension]) -> None:
    """Every value a dimension may give is one the config accepts (its ends, an inner point, each choice)."""
    for dim in dimensions:
        for value in dim.probes():
            try:
                base.config({dim.key: value})
            except ConfigError as exc:
                problem = "; ".join(exc.details) or exc.what
                raise ConfigError(
                    f"search space {dim.key}={dim.text()}: {problem}",
                    "narrow the range to values the key accepts (`tltool config keys`)",
                ) from None


METRICS: tuple[str, ...] = tuple(CheckpointConfig.model_fields["monitor"].annotation.__args__)


def direction(metric: str) -> str:
    return "minimize" if "loss" in metric else "maximize"


class TrialFailed(Exception):
    """A trial's run failed on its own (e.g. its learning rate made the loss non-finite): the sweep goes on."""


@dataclass
class TuneResult:
    out: Path
    metric: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    best_run_dir: str | None
    best_yaml: Path | None
    plots: list[Path]
    states: dict[str, int]
    ran: int


def _states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return counts


def recover(study: optuna.Study) -> list[int]:
    """Trials a dead sweep left running are marked failed; every failed trial that did not fail on its own
    (killed, interrupted) and was not retried yet is enqueued again with its parameters. The retried numbers."""
    optuna = import_optuna()
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == state.RUNNING:  # (the sweep lock is ours: its process is gone)
            study.tell(trial.number, state=state.FAIL)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    again = []
    for trial in study.get_trials(deepcopy=False):
        own_failure = "error" in trial.user_attrs
        if trial.state == state.FAIL and not own_failure and trial.number not in retried and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            again.append(trial.number)
    return again


def _finished(study: optuna.Study) -> int:
    """Trials that count towards --trials: completed, pruned, or failed on their own."""
    state = import_optuna().trial.TrialState
    return sum(
        t.state in (state.COMPLETE, state.PRUNED) or (t.state == state.FAIL and "error" in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


def _identity(cfg: Config, dimensions: Sequence[Dimension], metric: str) -> dict[str, Any]:
    data = cfg.to_dict()
    data["run"].pop("output_dir", None)
    return {"base": data, "space": {d.key: d.text() for d in dimensions}, "metric": metric}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def open_study(db: Path, metric: str, pruner: Any) -> optuna.Study:
    """The sweep's study in the SQLite file `db` (created, or loaded to continue); one line if it is no study."""
    optuna = import_optuna()
    from sqlalchemy.exc import SQLAlchemyError  # (optuna's RDB storage is SQLAlchemy's)

    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        return optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=direction(metric),
                                   load_if_exists=True, pruner=pruner)  # fmt: skip
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConfigError(f"{db} cannot be opened as an Optuna study ({reason})",
                          "choose another --out (the file is left as it is)") from None  # fmt: skip


def run_tune(
    config_path: str | None,
    items: Sequence[str],
    trials: int,
    space_file: str | None = None,
    out: str | None = None,
    metric: str = "val_acc1",
    names: ModelNames | None = None,
    echo: Callable[[str], None] = print,
    pruner: Any = None,
    command: str = "the same tltool tune command",
) -> TuneResult:
    """Run (or continue) the sweep until `trials` trials have finished; returns the best trial and what was written.

    `pruner`: an Optuna pruner (default `MedianPruner()`, Optuna's defaults: no pruning before 5 finished trials).
    """
    from tltool.distributed import launched
    from tltool.runlock import acquire
    from tltool.train import Interrupted, finetune

    if launched():  # (every rank would run its own study on one SQLite file, and a trial is a whole run)
        raise ConfigError("tltool tune runs its trials in one process, not under torchrun", "run it without torchrun")
    optuna = import_optuna()
    if trials < 1:
        raise ConfigError(f"--trials {trials}: a sweep needs at least one trial", "e.g. --trials 20")
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric} is not a per-epoch validation metric", f"use one of {', '.join(METRICS)}")
    dimensions, fixed = parse_space(items, space_file)
    base, base_cfg = load_base(config_path, fixed, names)
    if metric.endswith("_ema") and base_cfg.train.ema_decay is None:
        raise ConfigError(f"--metric {metric} needs train.ema_decay", f"set it (e.g. 0.9998) or use {metric[:-4]}")
    check_space(base, dimensions)
    out_dir = Path(out) if out else Path("runs") / f"{base_cfg.run.name}-tune"
    from tltool.plots import require_matplotlib

    require_matplotlib()  # (fail now, not after the sweep)
    lock = acquire(out_dir)
    try:
        db = out_dir / STUDY_FILE
        if not db.exists() and any(out_dir.glob("trial-*")):
            raise ConfigError(f"{out_dir} holds trial directories but no {STUDY_FILE}",
                              "choose another --out (nothing there is overwritten)")  # fmt: skip
        # (Optuna logs a failed trial with its traceback at WARNING: each trial's outcome is our own line)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = open_study(db, metric, pruner or optuna.pruners.MedianPruner())
        identity = _identity(base_cfg, dimensions, metric)
        known = study.user_attrs.get("tltool")
        if known is None:
            study.set_user_attr("tltool", identity)
        elif known != identity:
            changed = _differences(known, identity)
            raise ConfigError(
                f"{out_dir} holds a sweep of another config, space or metric ({'; '.join(changed[:3])})",
                "continue it with its own arguments, or choose another --out",
            )
        retried = recover(study)
        done = _finished(study)
        remaining = max(0, trials - done)
        if done or retried:
            again = f", trial(s) {', '.join(map(str, retried))} interrupted: run again" if retried else ""
            echo(f"continuing the sweep in {out_dir}: {done} trial(s) finished{again}")
        # Seeded from run.seed and the study's size: a fresh sweep is reproducible, a continued one does not
        # draw the first trials' values again.
        study.sampler = optuna.samplers.TPESampler(seed=base_cfg.run.seed + len(study.trials))

        def objective(trial: optuna.Trial) -> float:
            params = {dim.key: dim.suggest(trial) for dim in dimensions}
            run_dir = out_dir / f"trial-{trial.number:04d}"
            trial.set_user_attr("run_dir", str(run_dir))
            shown = " ".join(f"{k}={_short(v)}" for k, v in params.items())
            label = f"trial {trial.number}: {shown}"
            try:
                cfg = base.config({**params, "run.output_dir": str(run_dir)})
            except ConfigError as exc:
                trial.set_user_attr("error", exc.message())
                echo(f"{label}: failed, {'; '.join(exc.details) or exc.what}")
                raise TrialFailed(exc.message()) from None
            values: list[float] = []

            def on_epoch(record: dict[str, Any]) -> str | None:
                value = float(record[metric])
                values.append(value)
                trial.report(value, record["epoch"])
                return "pruned" if trial.should_prune() else None

            try:
                summary = finetune(cfg, quiet=True, config_path=str(config_path or "<config>"), on_epoch=on_epoch)
            except Interrupted:
                raise
            except TrainingError as exc:  # (this trial's own failure, e.g. a non-finite loss at its LR)
                trial.set_user_attr("error", exc.message())
                echo(f"{label}: failed, {exc.what}")
                raise TrialFailed(exc.message()) from None
            if not values:
                raise TrainingError(f"trial {trial.number} ran no epoch", "check the config (train.epochs)")
            best = min(values) if direction(metric) == "minimize" else max(values)
            if summary.get("stop_reason") == "pruned":
                echo(f"{label}: pruned after epoch {len(values)} ({metric} {values[-1]:.4f})")
                raise optuna.TrialPruned()
            echo(f"{label}: {metric} {best:.4f}{_features_note(summary.get('feature_cache'))}")
            return best

        try:
            study.optimize(objective, n_trials=remaining, catch=(TrialFailed,))
        except Interrupted as exc:
            raise Interrupted(f"sweep stopped during a trial: {exc.what}", f"continue the sweep with: {command}",
                              exc.exit_code) from None  # fmt: skip
        except KeyboardInterrupt:
            raise Interrupted("sweep stopped (Ctrl-C)", f"continue the sweep with: {command}", 130) from None
        return _finish(study, base, out_dir, metric, dimensions, remaining)
    finally:
        lock.release()


def _features_note(cache: dict[str, Any] | None) -> str:
    """How a trial got its frozen features (summary.json's feature_cache): extracted, or reused from the feature
    store, where an earlier trial of the sweep (or any earlier run on the same backbone and images) kept them."""
    if not cache:
        return ""
    if not cache["reused"]:
        return f" (features extracted in {cache['extract_seconds']:.1f} s)"
    parts = ", ".join(cache["reused"])
    return f" (features reused from the cache: {parts}; {cache['extract_seconds']:.1f} s)"


def _finish(study: optuna.Study, base: BaseConfig, out_dir: Path, metric: str, dimensions: Sequence[Dimension],
            ran: int) -> TuneResult:  # fmt: skip
    """best.yaml and the plots of a finished sweep."""
    state = import_optuna().trial.TrialState
    plots = write_plots(study, out_dir)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == state.COMPLETE]
    states = _states(study)
    if not complete:
        raise TrainingError(
            f"no trial of the sweep in {out_dir} completed ({', '.join(f'{n} {s}' for s, n in states.items())})",
            "see the trial directories; widen the search space or run more trials (pruning starts after 5)",
        )
    best = study.best_trial
    params = {dim.key: best.params[dim.key] for dim in dimensions}
    best_cfg = base.config(params)
    header = (
        f"# tltool tune: the best of {len(complete)} completed trial(s) in {out_dir}: trial {best.number}, "
        f"{metric} {best.value:.6g} (its run: {best.user_attrs.get('run_dir')})\n"
        + "".join(f"#   {k}: {_scalar_text(v)}\n" for k, v in params.items())
    )
    best_yaml = out_dir / "best.yaml"
    from tltool.files import write_text_atomic

    write_text_atomic(best_yaml, header + best_cfg.to_yaml())
    return TuneResult(out_dir, metric, best.value, params, best.number, best.user_attrs.get("run_dir"), best_yaml,
                      plots, states, ran)  # fmt: skip


def write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """history.png (each trial's value and the best so far) and, with 2+ completed trials, parallel_coordinates.png."""
    import matplotlib

    matplotlib.use("Agg")  # (no display; optuna's plots draw with pyplot)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    from tltool.files import write_atomic

    state = import_optuna().trial.TrialState
    complete = sum(t.state == state.COMPLETE for t in study.get_trials(deepcopy=False))
    made = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (ExperimentalWarning: the matplotlib backend of optuna's plots)
        drawers = [("history.png", optuna_plots.plot_optimization_history)]
        if complete >= 2:
            drawers.append(("parallel_coordinates.png", optuna_plots.plot_parallel_coordinate))
        for name, draw in drawers:
            axes = draw(study)
            figure = axes.figure
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            path = out_dir / name
            write_atomic(path, lambda f, data=buffer.getvalue(): f.write(data))
            made.append(path)
    return made


def format_result(result: TuneResult) -> str:
    states = ", ".join(f"{n} {s}" for s, n in sorted(result.states.items()))
    lines = [
        f"sweep in {result.out}: {states}",
        f"best: trial {result.best_trial}, {result.metric} {result.best_value:.4f} ({result.best_run_dir})",
        *(f"  {k}: {_scalar_text(v)}" for k, v in result.best_params.items()),
        f"best config written to {result.best_yaml}; train it with: tltool finetune {result.best_yaml}",
        *(f"plot: {p}" for p in result.plots),
    ]
    return "\n".join(lines)
