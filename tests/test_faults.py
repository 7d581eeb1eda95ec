"""Run-time faults: the run-directory lock, SIGTERM/SIGHUP/SIGUSR1, run.time_limit, the resume command.

The end-to-end ones run the real CLI in a subprocess on tiny data (the run helpers are test_reliability's).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_reliability import FULL, assert_same_run, cli_command, env, run

import tltool.train as train_module
from conftest import make_dataset, run_overrides, write_config
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config, parse_duration
from tltool.data import loading
from tltool.errors import ConfigError
from tltool.runlock import LOCK_NAME, RunLocked, acquire, process_alive, read_holder
from tltool.runlog import resume_command
from tltool.timelimit import SAFETY, TimeBudget
from tltool.train import TIME_LIMIT_EXIT, Interrupted, StopRequest

HOLDER = """
import sys, time
from pathlib import Path
from tltool.runlock import acquire
acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def start_holder(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], env=env(), stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


# --- the lock ------------------------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_taker_and_a_release_frees_and_removes_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "a"
    lock = acquire(run_dir)
    holder = read_holder(run_dir)
    assert holder.pid == os.getpid() and holder.host == socket.gethostname() and holder.since
    before = snapshot(run_dir)
    with pytest.raises(RunLocked) as refused:  # (a second open file in the same process: flock says no)
        acquire(run_dir)
    message = refused.value.message()
    assert f"pid {os.getpid()} on host {socket.gethostname()}, since {holder.since}" in message
    assert f"kill -TERM {os.getpid()}" in message and "--resume auto" in message and "\n" not in message
    assert snapshot(run_dir) == before  # the refused taker changed nothing
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()
    assert not (tmp_path / "runs").exists()  # the folders it created, left empty, are gone with it
    acquire(run_dir).release()


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    with pytest.raises(RunLocked, match=f"pid {holder.pid} on host"):
        acquire(run_dir)
    holder.send_signal(signal.SIGKILL)  # the kernel drops its flock; its record stays
    holder.wait(timeout=30)
    assert read_holder(run_dir).pid == holder.pid
    warnings: list[str] = []
    lock = acquire(run_dir, warn=warnings.append)
    assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0] and "taking it over" in warnings[0]
    assert read_holder(run_dir).pid == os.getpid()
    lock.release()


def test_another_hosts_lock_is_respected_and_a_live_record_without_flock_too(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A record whose flock is not seen here (another host over NFS without lock sharing): not stale.
    record = {"pid": 1, "host": "node-17", "since": "2026-01-01 00:00:00 UTC"}
    (run_dir / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(RunLocked) as refused:
        acquire(run_dir)
    assert "pid 1 on host node-17" in refused.value.what and f"remove {run_dir / LOCK_NAME}" in refused.value.fix
    assert json.loads((run_dir / LOCK_NAME).read_text()) == record  # left as it was
    # This host, a live process (a filesystem where flock is a no-op): the record alone refuses.
    parent = os.getppid()
    (run_dir / LOCK_NAME).write_text(json.dumps({**record, "pid": parent, "host": socket.gethostname()}))
    with pytest.raises(RunLocked, match=f"pid {parent}"):
        acquire(run_dir)
    # The same pid with another start time: the pid was reused, the holder is gone.
    assert process_alive(parent) and not process_alive(parent, start_ticks=1)
    (run_dir / LOCK_NAME).write_text(
        json.dumps({**record, "pid": parent, "host": socket.gethostname(), "start_ticks": 1})
    )
    acquire(run_dir, warn=lambda _: None).release()


def test_finetune_on_a_locked_run_directory_is_one_line_and_changes_nothing(tmp_path: Path, dataset: Path, cli) -> None:
    run_dir = tmp_path / "run"
    run(run_dir, dataset, "train.epochs=1")
    holder = start_holder(run_dir)
    try:
        before = snapshot(run_dir)
        config = write_config(tmp_path / "c.yaml", run_overrides(run_dir, dataset, "train.epochs=2"))
        for extra in ([], ["--resume", "auto"]):
            result = cli.invoke(app, ["finetune", str(config), *extra])
            assert result.exit_code == 2, result.output
            assert f"in use by another tltool run (pid {holder.pid} on host" in result.output
            assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
            assert snapshot(run_dir) == before
        dry = cli.invoke(app, ["finetune", str(config), "--resume", "auto", "--dry-run"])  # takes no lock
        assert dry.exit_code == 0, dry.output
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_run_directory_where_no_lock_can_be_made_is_one_line(tmp_path: Path, dataset: Path, cli) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "c.yaml", run_overrides(blocker / "run", dataset))
    result = cli.invoke(app, ["finetune", str(config)])
    assert result.exit_code == 2 and f"cannot create {blocker / 'run'}: {blocker} is a file" in result.output
    assert "Traceback" not in result.output and blocker.read_text() == "not a folder"
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            return  # (root ignores permissions: the case above is the one-line path)
        config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "ro", dataset))
        result = cli.invoke(app, ["finetune", str(config)])
        assert result.exit_code == 2 and LOCK_NAME in result.output, result.output
    finally:
        (tmp_path / "ro").chmod(0o700)


# --- signals ----------------------------------------------------------------------------------------------


def test_stop_signals_request_a_stop_with_128_plus_n_and_a_second_one_only_a_note(capsys) -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        before = signal.signal(signum, signal.SIG_DFL)
        try:
            stop = StopRequest()
            with stop.installed():
                os.kill(os.getpid(), signum)
                os.kill(os.getpid(), signum)  # (a scheduler or torchrun's agent repeats it: the save goes on)
                assert stop.requested and stop.reason == signum.name and stop.exit_code == 128 + signum
            assert signal.getsignal(signum) is signal.SIG_DFL  # the handler lasts only as long as the loop
        finally:
            signal.signal(signum, before)
    assert "already stopping" in capsys.readouterr().err
    stop = StopRequest()
    with stop.installed(), pytest.raises(KeyboardInterrupt):  # a second Ctrl-C outside torchrun: at once
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.exit_code == 130
        os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_ignored_at_start_stays_ignored_as_under_nohup() -> None:
    """`nohup tltool finetune ...`: SIGHUP is ignored when the run starts, and closing the terminal must not stop
    it; the other signals are still handled, SIGINT too when ignored (a shell's background job: kill -INT)."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    before_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopRequest()
        with stop.installed():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not stop.requested
            assert signal.getsignal(signal.SIGTERM) == stop.handler == signal.getsignal(signal.SIGINT)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
        signal.signal(signal.SIGINT, before_int)


def test_dataloader_workers_ignore_the_stop_signals() -> None:
    child = os.fork()
    if child == 0:  # a loader worker: its init function, then every stop signal (a job's signal reaches it too)
        try:
            loading._init_worker(0)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                signal.raise_signal(signum)
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # (-N had signal N killed it)


def test_the_resume_command_repeats_the_overrides_shell_quoted() -> None:
    command = resume_command("my cfg.yaml", ["train.lr=0.01", "run.name=a b", "data.train=/x/it's"])
    assert command == (
        "tltool finetune 'my cfg.yaml' train.lr=0.01 'run.name=a b' 'data.train=/x/it'\"'\"'s' --resume auto"
    )
    assert resume_command("c.yaml", None, world_size=2).startswith("tltool finetune c.yaml --resume auto (with 2")


@pytest.mark.slow
def test_sigterm_to_the_whole_job_saves_exits_143_and_resumes_to_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    data = make_dataset(tmp_path / "images", per_class=8)
    # 10 short epochs: the signal, sent once epoch 1 is logged, lands before the last step even when the test
    # process is slow to notice the file on a loaded machine (a stop after the last step is a finished run).
    extra = [*FULL, "train.epochs=10", "data.batch_size=4", "data.num_workers=1"]
    torch.set_num_threads(1)  # (as the subprocess, OMP_NUM_THREADS=1: the runs compare bit for bit)
    run(tmp_path / "straight", data, *extra)
    run_dir = tmp_path / "run dir"
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "elsewhere", data))
    # The overrides go on the command line (one needs quotes): the resume command must repeat them.
    overrides = [*extra, f"run.output_dir={run_dir}"]
    process = subprocess.Popen(cli_command(config, *overrides), env=env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGTERM)  # every process of the job, DataLoader workers included (as Slurm does)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr
    assert (
        f"continue with: tltool finetune {config} {' '.join(extra)} 'run.output_dir={run_dir}' --resume auto" in stderr
    )
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 1 <= saved.epoch < 10 and "SIGTERM: stopped" in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "SIGTERM" and summary["epochs_completed"] == saved.epoch
    assert not (run_dir / LOCK_NAME).exists()
    run(run_dir, data, *extra, resume="auto")
    assert_same_run(tmp_path / "straight", run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["stop_reason"] == "finished"


@pytest.mark.slow
def test_a_concurrent_second_run_is_refused_and_the_first_ends_unharmed(tmp_path: Path, cli) -> None:
    data = make_dataset(tmp_path / "images", per_class=16)
    extra = [*FULL, "train.epochs=3", "data.batch_size=4"]
    torch.set_num_threads(1)  # (as the subprocess, OMP_NUM_THREADS=1: the runs compare bit for bit)
    run(tmp_path / "straight", data, *extra)
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, *extra))
    first = subprocess.Popen(cli_command(config, "-q"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    lock = tmp_path / "run" / LOCK_NAME
    deadline = time.monotonic() + 300
    while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    for extra_args in ([], ["--resume", "auto"]):  # a re-submitted job, as a new run or a resume
        second = cli.invoke(app, ["finetune", str(config), *extra_args])
        assert second.exit_code == 2 and f"(pid {first.pid} on host" in second.output, second.output
    assert first.poll() is None, "the first run ended before the second tried: make it longer"
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_same_run(tmp_path / "straight", tmp_path / "run")
    assert not lock.exists()


def test_an_elastic_restart_takes_over_the_dead_attempts_lock(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)  # the first attempt's rank 0, then killed by torchrun
    holder.kill()
    holder.wait()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    summary = run(run_dir, dataset, "train.epochs=1")  # (world size 1: no process group, the restart's own paths)
    assert summary["epochs_completed"] == 1 and not (run_dir / LOCK_NAME).exists()


# --- run.time_limit ----------------------------------------------------------------------------------------


def test_time_limit_grammar_and_its_one_line_error(cli, tmp_path: Path, dataset: Path) -> None:
    assert [parse_duration(v) for v in ("3h30m", "90m", "45s", "1.5h", "2h5s", 120, "120")] == [
        12600, 5400, 45, 5400, 7205, 120, 120,
    ]  # fmt: skip
    for bad in ("30m3h", "3x", "", "h", 0, -5, "0s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="run.time_limit"):
        load_config(None, ["run.time_limit=3 hours"])
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", dataset))
    result = cli.invoke(app, ["finetune", str(config), "run.time_limit=90x"])
    assert result.exit_code == 2 and "run.time_limit: '90x' is not a duration" in result.output
    assert not (tmp_path / "run").exists()


def test_the_budget_rule_with_a_fake_clock() -> None:
    now = [100.0]
    budget = TimeBudget(60, checkpoint_bytes=50_000_000, val_batches=4, accumulate_steps=2, clock=lambda: now[0])
    # Before any measurement: no step yet, a save of 50 MB at 50 MB/s + 0.5 s, eval from the step time.
    assert budget.needed(with_eval=False) == pytest.approx(SAFETY * 1.5)
    budget.epoch_started()
    for seconds in (2.0, 5.0, 3.0):
        now[0] += seconds
        budget.step_done()
    assert budget.needed(False) == pytest.approx(SAFETY * (5.0 + 1.5))  # the slowest recent step
    assert budget.needed(True) == pytest.approx(SAFETY * (5.0 + 1.5 + 4 * 5.0 / 2))
    with budget.measure("save"):
        now[0] += 1.0
    with budget.measure("eval"):
        now[0] += 4.0
    assert budget.needed(True) == pytest.approx(SAFETY * (5.0 + 1.0 + 4.0))
    now[0] = 160 - SAFETY * 6.0  # exactly room for a step and a save
    assert not budget.exhausted(False) and budget.exhausted(True)
    now[0] += 0.01
    assert budget.exhausted(False)


class FakeClockBudget(TimeBudget):
    """Every step takes 1 s, a save 0.5 s, an evaluation 2 s, on a clock that starts at 0."""

    def __init__(self, limit, *args, **kwargs) -> None:
        self.now = 0.0
        kwargs.pop("start", None)
        super().__init__(limit, *args, clock=lambda: self.now, **kwargs)
        self.save_prior = 0.5  # (the real prior depends on the model's size)

    def step_done(self) -> None:
        self.now += 1.0
        super().step_done()

    @contextmanager
    def measure(self, what):
        with super().measure(what):
            self.now += {"save": 0.5, "eval": 2.0}[what]
            yield


@pytest.mark.slow
def test_time_limit_stops_saved_before_the_limit_exit_75_and_a_resume_gets_a_fresh_limit(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budgets: list[FakeClockBudget] = []

    def fake(*args, **kwargs):
        budgets.append(FakeClockBudget(*args, **kwargs))
        return budgets[-1]

    monkeypatch.setattr(train_module, "TimeBudget", fake)
    extra = ("train.epochs=3", "data.batch_size=4")
    run(tmp_path / "straight", dataset, *extra)
    steps = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt").global_step // 3
    # The rule by hand, limit 15 s: epoch 1 is `steps` steps + eval 2 + save 0.5; then room for a step and a
    # save is 1.5 x (1 + 0.5) = 2.25 s: epoch 2 stops after the first step k with steps + 2.5 + k + 2.25 > 15.
    k = int(15 - 2.25 - 2.5 - steps) + 1
    assert 1 <= k < steps - 1, "the dataset changed: choose another limit"
    with pytest.raises(Interrupted) as stopped:
        run(tmp_path / "run", dataset, *extra, "run.time_limit=15s")
    assert stopped.value.exit_code == TIME_LIMIT_EXIT == 75
    assert f"run.time_limit 15s reached: stopped at epoch 2, batch {k};" in stopped.value.what
    assert budgets[0].now == steps + 2.5 + k + 0.5 <= 15  # saved before the limit
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved.epoch == 1 and saved.epoch_progress["batches_done"] == k
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "time_limit" and summary["epochs_completed"] == 1
    # A resume gets the whole limit again: epoch 2's rest, then epoch 3 until the same rule stops it.
    with pytest.raises(Interrupted, match="stopped at epoch 3"):
        run(tmp_path / "run", dataset, *extra, "run.time_limit=15s", resume="auto")
    assert budgets[1].now <= 15 and budgets[1].now > 15 - 2.25 - 0.5
    run(tmp_path / "run", dataset, *extra, resume="auto")  # (no limit: to the end)
    assert_same_run(tmp_path / "straight", tmp_path / "run")


@pytest.mark.slow
def test_sigusr1_to_the_nproc_launcher_is_forwarded_and_every_rank_stops_saved_at_one_step(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "images", per_class=16)
    extra = ("train.feature_cache=off", "data.batch_size=4", "train.epochs=8", "run.dist_timeout_s=60")
    config = write_config(tmp_path / "c.yaml", run_overrides(tmp_path / "run", data, *extra))
    launcher = subprocess.Popen(cli_command(config, "--nproc", "2", "-q"), env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.02)
    launcher.send_signal(signal.SIGUSR1)  # the launcher only: torchrun's agent forwards it to the workers
    _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == 138, stderr[-3000:]
    stops = re.findall(r"(\[rank 1\] )?error: SIGUSR1: (stopped [^;]*);", stderr)
    assert len(stops) == 2 and stops[0][1] == stops[1][1], stderr  # both ranks, the same step
    assert "(with 2 processes again: --nproc 2" in stderr
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert len(saved.rank_states) == 2 and saved.epoch < 8
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stop_reason"] == "SIGUSR1"
    assert not (tmp_path / "run" / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_locked_run_directory_under_nproc_ends_the_job_with_exit_2(tmp_path: Path, dataset: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        config = write_config(tmp_path / "c.yaml", run_overrides(run_dir, dataset, "run.dist_timeout_s=60"))
        start = time.monotonic()
        done = subprocess.run(cli_command(config, "--nproc", "2", "-q"), env=env(), capture_output=True, text=True,
                              timeout=240)  # fmt: skip
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"in use by another tltool run (pid {holder.pid} on host" in done.stderr
        assert time.monotonic() - start < 120  # rank 1 does not wait for rank 0 until the timeout
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_the_nproc_launcher_asks_torchrun_to_forward_sigusr1_and_exits_128_plus_n(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from tltool.distributed import launch

    seen = {}

    def signalled(args) -> None:
        seen["signals"], seen["timeout"] = args.signals_to_handle, args.shutdown_timeout
        raise SignalException("got SIGUSR1", sigval=signal.SIGUSR1)

    monkeypatch.setattr("torch.distributed.run.run", signalled)
    assert launch(2, ["finetune", "x.yaml"]) == 138
    assert "SIGUSR1" in seen["signals"].split(",") and "SIGTERM" in seen["signals"] and seen["timeout"] == 60
