"""`tltool tune`: the search-space parser, the sweep (Optuna's study, trial runs, best.yaml, plots), pruning
through finetune's per-epoch hook, and continuing an interrupted sweep without rerunning finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tltool.cli import app
from tltool.config import load_config
from tltool.errors import ConfigError, TrainingError
from tltool.train import Interrupted
from tltool.tune import STUDY_FILE, STUDY_NAME, parse_space, run_tune

optuna = pytest.importorskip("optuna")

from conftest import run_overrides, write_config  # noqa: E402

SPACE = ["train.lr=loguniform(1e-4,1e-1)", "train.label_smoothing=choice(0,0.1)"]


@pytest.fixture()
def base(tmp_path: Path, dataset: Path, one_thread: None) -> list[str]:
    """Tiny frozen-backbone runs of 2 epochs (the run.output_dir is replaced by each trial's)."""
    return run_overrides(tmp_path / "unused", dataset, "train.epochs=2")


def study_of(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{(out / STUDY_FILE).resolve()}")


def states(out: Path) -> list[str]:
    return [t.state.name for t in study_of(out).trials]


# --- the search space --------------------------------------------------------------------------------


def test_each_distribution_parses_and_other_items_are_fixed_overrides() -> None:
    items = [
        "train.lr=loguniform(1e-5, 1e-1)",
        "train.label_smoothing=uniform(0,0.2)",
        "data.batch_size=int(4,16)",
        "train.optimizer=choice(sgd, adamw)",
        "train.backbone_lr_mult=choice(0.01,0.1,1)",
        "train.epochs=1",
    ]
    dims, fixed = parse_space(items)
    assert [(d.key, d.kind, d.values) for d in dims] == [
        ("train.lr", "loguniform", (1e-5, 1e-1)),  # (1e-5: a number, though YAML 1.1 reads a string)
        ("train.label_smoothing", "uniform", (0.0, 0.2)),
        ("data.batch_size", "int", (4, 16)),
        ("train.optimizer", "choice", ("sgd", "adamw")),
        ("train.backbone_lr_mult", "choice", (0.01, 0.1, 1)),
    ]
    assert fixed == ["train.epochs=1"]


def test_a_space_file_with_sections_or_dotted_keys_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(
        "train:\n  lr: loguniform(1e-5, 1e-2)\n  label_smoothing: uniform(0, 0.1)\ndata.batch_size: int(4, 8)\n"
    )
    dims, _ = parse_space(["train.lr=uniform(0.001,0.01)"], str(path))
    assert {d.key: (d.kind, d.values) for d in dims} == {
        "train.lr": ("uniform", (0.001, 0.01)),
        "train.label_smoothing": ("uniform", (0.0, 0.1)),
        "data.batch_size": ("int", (4, 8)),
    }


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("train.lr=loguniform(1e-5)", "takes two numbers"),
        ("train.lr=loguniform(0,1)", "needs low > 0"),
        ("train.lr=uniform(0.1,0.01)", "low must be below high"),
        ("data.batch_size=int(1.5,4)", "must be integers"),
        ("train.lr=uniform(a,b)", "must be finite numbers"),
        ("train.lr=choice([1,2])", "not a list of YAML scalars"),
        ("train.lr=choice(1,1)", "names a value twice"),
        ("run.output_dir=choice(a,b)", "tltool tune sets it"),
    ],
)
def test_bad_distributions_are_one_line(item: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_space([item])
    assert says in caught.value.message() and "\n" not in caught.value.message()


def test_an_unknown_key_is_one_line_with_did_you_mean_exit_2_nothing_written(cli, tmp_path: Path, base) -> None:
    config = write_config(tmp_path / "base.yaml", base)
    result = cli.invoke(app, ["tune", str(config), "train.lrr=loguniform(1e-4,1e-1)", "--out", "sweep"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: search space key 'train.lrr' is not a config key; did you mean 'train.lr'? — "
        "`tltool config keys` lists every key"
    ]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("train.lr=uniform(-1,1)", "train.lr: Input should be greater than 0"),
        ("train.epochs=uniform(1,3)", "train.epochs"),
    ],
)
def test_a_range_the_config_refuses_is_one_line(cli, tmp_path: Path, base, item: str, says: str) -> None:
    config = write_config(tmp_path / "base.yaml", base)
    result = cli.invoke(app, ["tune", str(config), item, "--out", "sweep"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and says in result.output, result.output
    assert not (tmp_path / "sweep").exists()


# --- the sweep ---------------------------------------------------------------------------------------


def test_a_sweep_samples_in_range_runs_trials_as_runs_and_writes_best_yaml_and_plots(cli, tmp_path: Path, base):
    config = write_config(tmp_path / "base.yaml", base)
    (tmp_path / "space.yaml").write_text("data:\n  batch_size: int(4, 8)\n")
    result = cli.invoke(app, ["tune", str(config), "--trials", "3", *SPACE, "--space", "space.yaml", "--out", "sw"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "sw"
    study = study_of(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for trial in study.trials:
        assert 1e-4 <= trial.params["train.lr"] <= 1e-1
        assert trial.params["train.label_smoothing"] in (0, 0.1)
        assert 4 <= trial.params["data.batch_size"] <= 8 and isinstance(trial.params["data.batch_size"], int)
        run_dir = out / f"trial-{trial.number:04d}"  # a normal run directory, with the trial's values
        assert trial.user_attrs["run_dir"] == str(Path("sw") / run_dir.name)  # (as --out was given)
        ran = load_config(run_dir / "config.yaml")
        assert (ran.train.lr, ran.data.batch_size) == (trial.params["train.lr"], trial.params["data.batch_size"])
        # each epoch's value reported to Optuna is the run's metrics.jsonl record; the trial's value their best
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert trial.intermediate_values == {r["epoch"]: r["val_acc1"] for r in records}
        assert trial.value == max(r["val_acc1"] for r in records)
        assert json.loads((run_dir / "summary.json").read_text())["stop_reason"] == "finished"
    best = study.best_trial
    expected = load_config(config, [f"{k}={v!r}" for k, v in best.params.items()])
    assert load_config(out / "best.yaml") == expected  # base config + the best values, nothing else
    assert f"best: trial {best.number}, val_acc1 {best.value:.4f}" in result.output
    assert f"best config written to {out.name}/best.yaml" in result.output
    for name in ("history.png", "parallel_coordinates.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sampler_is_seeded_from_run_seed(tmp_path: Path, base) -> None:
    def params(out: str, seed: int, trials: int) -> list[dict]:
        run_tune(None, [*base, "train.epochs=1", f"run.seed={seed}", *SPACE], trials, out=out, echo=lambda _: None)
        return [t.params for t in study_of(tmp_path / out).trials]

    first = params("a", 0, 2)
    assert params("b", 0, 2) == first
    assert params("c", 1, 1) != first[:1]


def test_pruning_stops_a_trial_after_its_epoch_saved(tmp_path: Path, base) -> None:
    # val_acc1 is at most 1: ThresholdPruner(lower=2) prunes every trial at its first report.
    pruner = optuna.pruners.ThresholdPruner(lower=2.0)
    with pytest.raises(TrainingError, match="no trial of the sweep in .* completed"):
        run_tune(None, [*base, *SPACE], 2, out="sw", pruner=pruner, echo=lambda _: None)
    assert states(tmp_path / "sw") == ["PRUNED", "PRUNED"]
    for trial in ("trial-0000", "trial-0001"):
        run_dir = tmp_path / "sw" / trial
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # of train.epochs=2
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stop_reason"] == "pruned" and summary["epochs_completed"] == 1
        assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "sw" / "history.png").is_file()  # (written even when nothing completed)


def test_an_interrupted_sweep_continues_without_rerunning_finished_trials(tmp_path, base, monkeypatch) -> None:
    import tltool.train

    real = tltool.train.finetune
    calls: list[str] = []
    interrupt_at = [2]

    def interrupted_in_second_trial(cfg, **kwargs):
        calls.append(cfg.run.output_dir)
        if len(calls) in interrupt_at:  # a Ctrl-C during trial 1's first epoch, as StopRequest reports it
            raise Interrupted("stopped at epoch 1, batch 1", "", 130)
        return real(cfg, **kwargs)

    monkeypatch.setattr(tltool.train, "finetune", interrupted_in_second_trial)
    with pytest.raises(Interrupted) as caught:
        run_tune(None, [*base, "train.epochs=1", *SPACE], 3, out="sw", echo=lambda _: None, command="tltool tune again")
    assert caught.value.exit_code == 130 and "continue the sweep with: tltool tune again" in caught.value.message()
    out = tmp_path / "sw"
    assert states(out) == ["COMPLETE", "FAIL"]
    first_run = (out / "trial-0000" / "metrics.jsonl").stat().st_mtime_ns
    interrupted_params = study_of(out).trials[1].params

    calls.clear()
    interrupt_at.clear()
    run_tune(None, [*base, "train.epochs=1", *SPACE], 3, out="sw", echo=lambda _: None)
    study = study_of(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert calls == ["sw/trial-0002", "sw/trial-0003"]  # trial 0 was not run again
    assert (out / "trial-0000" / "metrics.jsonl").stat().st_mtime_ns == first_run
    assert study.trials[2].params == interrupted_params and study.trials[2].user_attrs["retry_of"] == 1
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0000", "trial-0002", "trial-0003"]

    calls.clear()  # finished: the same command again runs nothing
    run_tune(None, [*base, "train.epochs=1", *SPACE], 3, out="sw", echo=lambda _: None)
    assert calls == [] and len(study_of(out).trials) == 4


def test_a_trial_that_fails_on_its_own_is_counted_and_not_rerun(tmp_path: Path, base, monkeypatch) -> None:
    import tltool.train

    real, calls = tltool.train.finetune, []

    def diverging_first_trial(cfg, **kwargs):
        calls.append(cfg.run.output_dir)
        if len(calls) == 1:  # as train_one_epoch reports a non-finite loss
            raise TrainingError("the loss became nan at epoch 1, batch 1", "lower train.lr")
        return real(cfg, **kwargs)

    monkeypatch.setattr(tltool.train, "finetune", diverging_first_trial)
    lines: list[str] = []
    items = [*base, "train.epochs=1", *SPACE]
    run_tune(None, items, 2, out="sw", echo=lines.append)
    assert states(tmp_path / "sw") == ["FAIL", "COMPLETE"]
    assert any(line.startswith("trial 0: ") and line.endswith("failed, the loss became nan at epoch 1, batch 1")
               for line in lines), lines  # fmt: skip
    calls.clear()
    run_tune(None, items, 2, out="sw", echo=lambda _: None)  # 2 finished (one failed on its own): nothing to run
    assert calls == [] and states(tmp_path / "sw") == ["FAIL", "COMPLETE"]


# A sweep killed with SIGKILL in trial 1, once its first epoch is saved (no handler, no cleanup: the trial
# stays RUNNING in study.db, the sweep's lock file names a dead process).
KILLED_SWEEP = """
import os, signal, sys
import tltool.train
from tltool.tune import run_tune

real, calls = tltool.train.finetune, []

def finetune(cfg, **kwargs):
    calls.append(cfg)
    if len(calls) == 2:
        report = kwargs["on_epoch"]
        kwargs["on_epoch"] = lambda record: (report(record), os.kill(os.getpid(), signal.SIGKILL))
    return real(cfg, **kwargs)

tltool.train.finetune = finetune
run_tune(None, sys.argv[1:], 3, out="sw")
"""


def test_a_sweep_killed_in_a_trial_continues_it_as_a_new_trial_and_keeps_the_finished_one(tmp_path, base) -> None:
    items = [*base, *SPACE]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED_SWEEP, *items], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    out = tmp_path / "sw"
    assert states(out) == ["COMPLETE", "RUNNING"]
    killed = study_of(out).trials[1]
    assert len((out / "trial-0001" / "metrics.jsonl").read_text().splitlines()) == 1
    first_run = {p.name: p.stat().st_mtime_ns for p in (out / "trial-0000").rglob("*")}

    lines: list[str] = []
    run_tune(None, items, 3, out="sw", echo=lines.append)
    trials = study_of(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == killed.params and trials[2].user_attrs["retry_of"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trial-0000").rglob("*")} == first_run  # not rerun
    assert "continuing the sweep in sw: 1 trial(s) finished, trial(s) 1 interrupted: run again" in lines
    assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-000{i}" for i in range(4)]


def test_a_sweep_directory_of_another_space_is_refused(cli, tmp_path: Path, base) -> None:
    config = write_config(tmp_path / "base.yaml", [*base, "train.epochs=1"])
    assert cli.invoke(app, ["tune", str(config), "-n", "1", *SPACE, "--out", "sw"]).exit_code == 0
    result = cli.invoke(app, ["tune", str(config), "-n", "2", "train.lr=uniform(0.01,0.1)", "--out", "sw"])
    assert result.exit_code == 2
    assert result.output.startswith("error: sw holds a sweep of another config, space or metric (space.")
    assert len(result.output.strip().splitlines()) == 1
    assert states(tmp_path / "sw") == ["COMPLETE"]


def test_a_study_file_that_is_no_database_is_one_line_and_kept(cli, tmp_path: Path, base) -> None:
    config = write_config(tmp_path / "base.yaml", base)
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / STUDY_FILE).write_text("not a database")
    result = cli.invoke(app, ["tune", str(config), *SPACE, "--out", "sw"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "sw/study.db cannot be opened as an Optuna study (file is not a database)" in result.output
    assert (tmp_path / "sw" / STUDY_FILE).read_text() == "not a database"


def test_trials_after_the_first_reuse_the_frozen_features(tmp_path: Path, base, monkeypatch) -> None:
    """A frozen-backbone sweep extracts the features once: trial 0 runs the backbone over train and val and keeps
    them in the feature store; trials 1 and 2 (other LR, batch size, label smoothing) find both parts there,
    run the backbone on no image, and say so; their results are those of their own run."""
    import tltool.features as features

    extracted: list[int] = []  # the images each backbone pass ran on
    real = features._extract_views

    def counting(backbone, samples, *args, **kwargs):
        extracted.append(len(samples))
        return real(backbone, samples, *args, **kwargs)

    monkeypatch.setattr(features, "_extract_views", counting)
    lines: list[str] = []
    space = [*SPACE, "data.batch_size=int(4,8)"]
    run_tune(None, [*base, *space], 3, out="sw", echo=lines.append)
    assert states(tmp_path / "sw") == ["COMPLETE"] * 3
    summaries = [json.loads((tmp_path / "sw" / f"trial-{n:04d}" / "summary.json").read_text()) for n in range(3)]
    assert summaries[0]["feature_cache"]["reused"] == []
    assert [s["feature_cache"]["reused"] for s in summaries[1:]] == [["train", "val"]] * 2
    assert len(extracted) == 2 and sum(extracted) == summaries[0]["train_images"] + summaries[0]["val_images"]
    assert "features extracted in" in lines[0] and "features reused from the cache: train, val" in lines[1]
    assert "features reused from the cache: train, val" in lines[2]


def test_under_torchrun_it_is_one_line_exit_2_nothing_written(
    cli, tmp_path: Path, base, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = write_config(tmp_path / "base.yaml", base)
    result = cli.invoke(app, ["tune", str(config), "train.lr=loguniform(1e-4,1e-1)", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: tltool tune runs its trials in one process, not under torchrun — run it without torchrun"
    ]
    assert not (tmp_path / "s").exists()
