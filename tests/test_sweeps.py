"""Sweeps as a user runs them: a grid through submitit's local executor (the SLURM launcher's code
path on one machine) whose runs are preempted, requeued and resumed, an Optuna search, a failed run,
the sbatch script the SLURM launcher submits, an unknown launcher; and the sweep summary and the
callback of recsys/runs/sweeps.py on their own."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from recsys.errors import UserInputError
from recsys.runs.optuna_space import search_space
from recsys.runs.optuna_sweep import RESULTS_FILE, SweepFailed, make_sampler, prepare
from recsys.runs.sweeps import OVERRIDES_FILE, SweepSummary, main, sweep_table, write_sweep_summary
from tests.checks import Untouched, assert_user_error
from tests.test_entrypoints import ROOT, common, run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_sweep(tmp, sweep_dir, *extra, epochs=1):
    return [
        "data=synthetic",
        "logger=csv",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "~callbacks.rich_progress_bar",
        "model.dim=32",
        f"hydra.sweep.dir={sweep_dir}",
        *common(tmp),
        *extra,
    ]


def read_summary(sweep_dir):
    return pd.read_csv(sweep_dir / "sweep_summary.csv"), (sweep_dir / "sweep_summary.md").read_text()


def submitit_tasks(sweep_dir):
    """The processes running the jobs of a local submitit sweep (children of each job's controller,
    whose pid names the job's folder in .submitit/)."""
    tasks = []
    for job in (sweep_dir / ".submitit").iterdir():
        if job.name.isdigit():
            for child in Path(f"/proc/{job.name}/task/{job.name}/children").read_text().split():
                if b"submitit.core._submit" in Path(f"/proc/{child}/cmdline").read_bytes():
                    tasks.append(int(child))
    return tasks


def submitit_task_of(sweep_dir, job):
    """The process running sweep job `job`: the one holding a file of its run directory open
    (Hydra's job log, `train.log`), or None while there is none yet."""
    run_dir = f"{sweep_dir / job}/"
    for task in submitit_tasks(sweep_dir):
        try:
            for fd in Path(f"/proc/{task}/fd").iterdir():
                if os.readlink(fd).startswith(run_dir):
                    return task
        except OSError:  # the process ended or closed the file meanwhile
            continue
    return None


@pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
    reason="finds the jobs through /proc",
)
def test_grid_sweep_through_the_submitit_local_launcher_requeues_and_resumes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = tiny_sweep(tmp_path, sweep_dir, epochs=3)
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local", "model.dropout=0.1,0.3"]
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    with subprocess.Popen(
        [*command, *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        # Preempt each run as soon as it has saved a checkpoint (two epochs before its end):
        # SIGUSR2, what SLURM sends before the time limit, caught by submitit, which requeues the
        # job (same overrides, same directory). Each job on its own clock: waiting for both let a
        # fast job finish before a slow one (on a loaded machine) had saved anything.
        try:
            deadline = time.monotonic() + 300
            preempted = set()
            while len(preempted) < 2:
                if process.poll() is not None:
                    pytest.fail(f"the sweep ended before both runs were preempted:\n{process.stdout.read()}")
                assert time.monotonic() < deadline, f"preempted only {sorted(preempted)} after 300 s"
                for job in {"0", "1"} - preempted:
                    if not (sweep_dir / job / "checkpoints" / "last.ckpt").is_file():
                        continue
                    assert not (sweep_dir / job / "metrics.json").exists(), f"run {job} ended unpreempted"
                    task = submitit_task_of(sweep_dir, job)
                    if task is not None:
                        os.kill(task, signal.SIGUSR2)
                        preempted.add(job)
                time.sleep(0.05)
            output, _ = process.communicate(timeout=300)
        except BaseException:
            process.kill()
            raise
    assert process.returncode == 0, output[-3000:]
    # Each run in its own directory, in its own process (one submitit job each), resumed there.
    dropouts = []
    for job in ("0", "1"):
        run_dir = sweep_dir / job
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["epochs"] == 3 and metrics["resumed_from"]
        dropouts.append(OmegaConf.load(run_dir / "config.yaml").model.dropout)
        assert f"model.dropout={dropouts[-1]}" in OmegaConf.load(run_dir / OVERRIDES_FILE)
    assert sorted(dropouts) == [0.1, 0.3]
    jobs = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2 and all(any(j.glob("*_result.pkl")) for j in jobs)
    logs = "".join(log.read_text() for job in jobs for log in job.glob("*_log.*"))
    assert logs.count("Caught signal SIGUSR2") >= 2 and logs.count("Requeued job") >= 2
    # The summary, written by the launching process after both jobs finished.
    table, markdown = read_summary(sweep_dir)
    assert len(table) == 2 and set(table["run"].astype(str)) == {"0", "1"}
    assert (table["status"] == "completed").all()
    assert table["val/ndcg@10"].is_monotonic_decreasing and table["best"].tolist() == [True, False]
    assert (
        table["val/ndcg@10"].iloc[0]
        == json.loads((Path(table["run_dir"].iloc[0]) / "metrics.json").read_text())["val/ndcg@10"]
    )
    assert "**best**" in markdown and "`model.dropout=0.1`" in markdown and "`model.dropout=0.3`" in markdown
    assert "sweep summary (2 of 2 runs completed)" in output


def test_optuna_sweep_writes_its_results_and_the_summary(tmp_path):
    sweep_dir = tmp_path / "optuna"
    storage = tmp_path / "studies" / "sasrec.journal"
    # hydra.mode is MULTIRUN in the config: no -m needed. A searched key given on the command line
    # (model.dim, model.num_blocks) is fixed, not searched. The study is kept in a journal file.
    overrides = tiny_sweep(tmp_path, sweep_dir, "model.num_blocks=1", f"hydra.sweeper.storage={storage}")
    run("train.py", "+hparams_search=sasrec_optuna", "hydra.sweeper.n_trials=2", *overrides)
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert set(results.best_params) == {"model.optimizer.lr", "model.dropout", "model.optimizer.weight_decay"}
    table, markdown = read_summary(sweep_dir)
    assert len(table) == 2 and (table["status"] == "completed").all()
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    # What Optuna maximised is what train.py wrote: val/ndcg@10 of the best run.
    assert results.best_value == pytest.approx(table["val/ndcg@10"].max())
    best_run = table[table["best"]].iloc[0]
    assert results.best_run_dir == best_run["run_dir"]
    for key, value in results.best_params.items():
        assert f"{key}={value}" in best_run["overrides"]
    assert "model.num_blocks=1" in best_run["overrides"] and "model.dim=32" in best_run["overrides"]
    assert "Optuna (optimization_results.yaml): best value" in markdown
    # The study outlives the process: each trial in the journal with its value and run directory.
    study = optuna.load_study(
        study_name="sasrec", storage=JournalStorage(JournalFileBackend(str(storage))), sampler=None
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for trial in study.trials:
        metrics = json.loads((Path(trial.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["val/ndcg@10"])
        assert set(trial.params) == set(results.best_params)
        run_overrides = OmegaConf.load(Path(trial.user_attrs["run_dir"]) / OVERRIDES_FILE)
        assert trial.user_attrs["overrides"] == list(run_overrides)


def test_a_failed_optuna_trial_stops_the_search_and_is_failed_in_the_study(tmp_path):
    # The failure rule of the search (max_failure_rate 0): the first batch (one trial) fails, the
    # sweep stops with the run's error, the summary lists the run, the study records it as failed.
    sweep_dir = tmp_path / "failing"
    storage = tmp_path / "study.journal"
    result = run(
        "train.py",
        "+hparams_search=sasrec_optuna",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.storage={storage}",
        "model.optimizer.lr=-1",
        *tiny_sweep(tmp_path, sweep_dir),
        check=False,
    )
    assert result.returncode == 1 and "Invalid learning rate: -1" in result.stderr
    assert "1 of 1 trials of the batch failed" in result.stdout + result.stderr
    table, markdown = read_summary(sweep_dir)
    assert table["run"].astype(str).tolist() == ["0"] and table["status"].tolist() == ["failed"]
    assert "1 runs, 0 completed, 1 failed" in markdown
    assert not (sweep_dir / "optimization_results.yaml").exists()  # no trial completed
    study = optuna.load_study(study_name="sasrec", storage=JournalStorage(JournalFileBackend(str(storage))))
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_bad_search_settings_are_one_line_errors_before_anything_runs(tmp_path):
    sweep_dir = tmp_path / "bad"
    untouched = Untouched(sweep_dir, tmp_path / "cache", tmp_path / "logs")
    result = run(
        "train.py",
        "+hparams_search=sasrec_optuna",
        "hydra.sweeper.direction=up",
        *tiny_sweep(tmp_path, sweep_dir),
        check=False,
    )
    assert_user_error(
        result,
        "error: hydra.sweeper.direction: 'up' is not maximize or minimize "
        "(one objective: train.py returns val/ndcg@10)",
        untouched,
        exact=True,
    )


def test_the_sweeper_plugin_module_imports_neither_optuna_nor_recsys():
    # Hydra imports every plugin module at each start of train.py, evaluate.py, predict.py.
    code = (
        "import sys, hydra_plugins.recsys_optuna_sweeper.optuna_sweeper; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'optuna', 'recsys', 'torch'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_slurm_launcher_submits_the_configured_sbatch_script(tmp_path, monkeypatch):
    # Stand-ins for SLURM's commands: sbatch keeps the script it is given and refuses the job.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "submitted.sh"
    for name, body in (
        ("srun", "exit 1"),
        ("sbatch", f'cp "$1" {script}; echo "no cluster here" >&2; exit 1'),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep_dir = tmp_path / "slurm"
    result = run(
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "model.dropout=0.1,0.3",
        *tiny_sweep(tmp_path, sweep_dir),
        check=False,
    )
    assert result.returncode != 0 and "no cluster here" in result.stdout + result.stderr
    lines = script.read_text().splitlines()
    for flag in (
        "--partition=gpu",
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--time=1440",
        "--signal=USR2@120",
        "--requeue",
        "--array=0-1%2",
    ):
        assert f"#SBATCH {flag}" in lines, flag
    assert any(line.startswith("srun ") and "-m submitit.core._submit" in line for line in lines)
    assert f"{sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out" in script.read_text()


def test_a_failed_run_is_listed_in_the_summary_and_fails_the_sweep(tmp_path):
    # An exception in a run (not bad input, which exits at once): Hydra's sweeper raises after the
    # batch and skips on_multirun_end; the summary written as each run ended remains.
    sweep_dir = tmp_path / "failing"
    result = run("train.py", "-m", "model.optimizer.lr=-1", *tiny_sweep(tmp_path, sweep_dir), check=False)
    assert result.returncode == 1 and "Invalid learning rate: -1" in result.stderr
    table, markdown = read_summary(sweep_dir)
    assert (
        table["status"].tolist() == ["failed"]
        and table["overrides"].str.contains("model.optimizer.lr=-1").all()
    )
    assert "1 runs, 0 completed, 1 failed" in markdown


def test_an_unknown_launcher_is_refused_by_hydra_with_the_options():
    # What `python train.py -m hydra/launcher=slurmm` prints (exit status 1, nothing written):
    # "In 'hydra/config': Could not find 'hydra/launcher/slurmm'" and the available options.
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        with pytest.raises(MissingConfigException) as error:
            compose("train", overrides=["hydra/launcher=slurmm"], return_hydra_config=True)
    message = str(error.value)
    assert message.startswith("In 'hydra/config': Could not find 'hydra/launcher/slurmm'")
    assert "Available options in 'hydra/launcher':" in message
    assert "\tlocal\n" in message and "\tslurm\n" in message


def test_slurm_launcher_config_follows_the_trainer():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        single = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        ddp = compose(
            "train",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = single.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert (launcher.max_num_timeout, launcher.signal_delay_s, launcher.additional_parameters.requeue) == (
        3,
        120,
        True,
    )
    assert (
        ddp.hydra.launcher.gpus_per_node,
        ddp.hydra.launcher.tasks_per_node,
        ddp.hydra.launcher.nodes,
    ) == (8, 8, 2)


# --- recsys/runs/sweeps.py on its own ----------------------------------------------------------------


def fake_run(sweep_dir, name, overrides, metrics=None):
    run_dir = sweep_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / OVERRIDES_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_summary_lists_failed_runs_and_sorts_by_validation_ndcg(tmp_path):
    sweep = tmp_path / "sweep"
    for job, value in ((0, 0.20), (2, 0.35), (10, 0.30)):
        fake_run(
            sweep,
            str(job),
            ["data=x", f"model.dropout={job}"],
            {"val/ndcg@10": value, "test/ndcg@10": value - 0.1, "test/hr@10": 0.5, "best_epoch": job},
        )
    fake_run(sweep, "1", ["data=x", "model.dropout=1"])  # died before writing metrics.json
    (sweep / ".submitit" / "7").mkdir(parents=True)
    (sweep / ".submitit" / "7" / "metrics.json").write_text("{}")  # not a run
    table = write_sweep_summary(sweep)
    assert table["run"].tolist() == ["2", "10", "0", "1"]
    assert table["status"].tolist() == ["completed", "completed", "completed", "failed"]
    assert table["best"].tolist() == [True, False, False, False]
    assert table["best_epoch"].iloc[0] == 2 and pd.isna(table["val/ndcg@10"].iloc[3])
    csv = pd.read_csv(sweep / "sweep_summary.csv")
    assert csv["overrides"].iloc[3] == "data=x model.dropout=1" and csv["run_dir"].iloc[0] == str(
        (sweep / "2").resolve()
    )
    markdown = (sweep / "sweep_summary.md").read_text()
    assert "4 runs, 3 completed, 1 failed" in markdown and "Overrides of every run: `data=x`" in markdown
    assert "| **best** | 2 | completed | `model.dropout=2` | 0.3500 | 0.2500 | 0.5000 | 2 |" in markdown
    assert "| 1 | failed | `model.dropout=1` |  |  |  |  |" in markdown
    assert not list(sweep.glob(".sweep_summary*"))  # no temporary files left


def test_summary_of_an_empty_sweep_and_the_command_line(tmp_path, capsys):
    assert len(sweep_table(tmp_path)) == 0
    assert main([str(tmp_path)]) == 0
    assert "0 runs, 0 completed, 0 failed" in capsys.readouterr().out
    assert (tmp_path / "sweep_summary.csv").is_file()
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: not a directory"


def job_config(tmp_path, mode=RunMode.MULTIRUN, job="3"):
    return OmegaConf.create(
        {
            "hydra": {
                "mode": mode,
                "sweep": {"dir": str(tmp_path / "2026-01-01_00-00-00_000000")},
                "runtime": {"output_dir": str(tmp_path / "2026-01-01_00-00-00_000000" / job)},
                "overrides": {"task": ["model=sasrec", "seed=1"]},
            }
        }
    )


def test_callback_records_overrides_and_groups_wandb_runs_by_sweep(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    callback = SweepSummary()
    callback.on_job_start(job_config(tmp_path), task_function=None)
    run_dir = tmp_path / "2026-01-01_00-00-00_000000" / "3"
    assert OmegaConf.to_container(OmegaConf.load(run_dir / OVERRIDES_FILE)) == ["model=sasrec", "seed=1"]
    assert os.environ["WANDB_RUN_GROUP"] == "2026-01-01_00-00-00_000000"
    callback.on_job_start(job_config(tmp_path, job="4"), task_function=None)  # the next run, same process
    assert os.environ["WANDB_RUN_GROUP"] == "2026-01-01_00-00-00_000000"
    # A group the user chose is kept; a single run (RUN mode) is left alone.
    monkeypatch.setenv("WANDB_RUN_GROUP", "mine")
    SweepSummary().on_job_start(job_config(tmp_path, job="5"), task_function=None)
    assert os.environ["WANDB_RUN_GROUP"] == "mine"
    SweepSummary().on_job_start(job_config(tmp_path, mode=RunMode.RUN, job="6"), task_function=None)
    assert not (tmp_path / "2026-01-01_00-00-00_000000" / "6").exists()


def test_callback_rewrites_the_summary_as_each_run_ends_on_rank_zero_only(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    sweep = tmp_path / "2026-01-01_00-00-00_000000"
    callback = SweepSummary()
    callback.on_job_start(job_config(tmp_path), task_function=None)
    monkeypatch.setenv("RANK", "1")  # another process of a DDP run: leaves the summary to rank 0
    callback.on_job_end(job_config(tmp_path), job_return=None)
    assert not (sweep / "sweep_summary.csv").exists()
    monkeypatch.setenv("RANK", "0")
    callback.on_job_end(job_config(tmp_path), job_return=None)
    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert table["run"].tolist() == [3] and table["status"].tolist() == ["failed"]


# --- the Optuna sweeper on its own (recsys/runs/optuna_sweep.py) --------------------------------------


def search_config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "train", overrides=["+hparams_search=sasrec_optuna", *overrides], return_hydra_config=True
        ).hydra.sweeper


def test_the_search_config_keeps_its_space_and_settings():
    sweeper = search_config()
    assert sweeper._target_ == "hydra_plugins.recsys_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert (sweeper.direction, sweeper.storage, sweeper.study_name) == ("maximize", None, "sasrec")
    assert (sweeper.n_trials, sweeper.n_jobs, sweeper.max_failure_rate) == (30, 1, 0.0)
    assert sweeper.sampler == {"_target_": "optuna.samplers.TPESampler", "seed": 1234, "n_startup_trials": 10}
    sampler = make_sampler(sweeper.sampler)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    # The command line's keys join the space: a plain value fixes a key, a sweep searches it.
    space = search_space(sweeper.params, ["data=synthetic", "model.dim=32", "seed=1,2", "~callbacks.x"])
    assert space.distributions == {
        "model.optimizer.lr": FloatDistribution(0.0003, 0.01, log=True),
        "model.dropout": FloatDistribution(0.1, 0.6),
        "model.num_blocks": CategoricalDistribution([1, 2, 3]),
        "model.optimizer.weight_decay": CategoricalDistribution([0.0, 0.01, 0.1]),
        "seed": CategoricalDistribution([1, 2]),
    }
    params = {"model.optimizer.lr": 0.001, "model.dropout": 0.25, "model.num_blocks": 2}
    params.update({"model.optimizer.weight_decay": 0.01, "seed": 2})
    assert space.overrides(params) == [
        "model.optimizer.lr=0.001",
        "model.dropout=0.25",
        "model.num_blocks=2",
        "model.optimizer.weight_decay=0.01",
        "data=synthetic",
        "model.dim=32",
        "seed=2",
        "~callbacks.x",
    ]
    # Another sampler by group, its keys on the command line.
    random = search_config("hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=3").sampler
    assert isinstance(make_sampler(random), optuna.samplers.RandomSampler)


def test_search_space_syntax_and_optunas_own_terms():
    space = search_space(
        {
            "a": "range(1, 10, 3)",  # Hydra's range: 1, 4, 7
            "b": "range(0.5, 0.1, -0.1)",  # 0.5 .. 0.2
            "c": "choice('x y', [1,2], true)",
            "d": {"type": "int", "low": 8, "high": 64, "log": True},
            "e": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25},
            "f": {"type": "categorical", "choices": ["adam", "sgd"]},
            "+g": "tag(log, interval(1, 100))",
            "h": 5,
        }
    )
    assert space.distributions == {
        "a": IntDistribution(1, 7, step=3),
        "b": FloatDistribution(0.2, 0.5, step=0.1),
        "c": CategoricalDistribution(["x y", "[1,2]", True]),
        "d": IntDistribution(8, 64, log=True),
        "e": FloatDistribution(0.0, 1.0, step=0.25),
        "f": CategoricalDistribution(["adam", "sgd"]),
        "+g": FloatDistribution(1.0, 100.0, log=True),
    }
    params = {"a": 4, "b": 0.3, "c": "x y", "d": 16, "e": 0.5, "f": "sgd", "+g": 2.5}
    assert space.overrides(params) == ["a=4", "b=0.3", "c=x\\ y", "d=16", "e=0.5", "f=sgd", "+g=2.5", "h=5"]
    assert space.overrides({**params, "c": "[1,2]"})[2] == "c=[1,2]"
    assert space.overrides({**params, "c": True})[2] == "c=true"
    assert space.probe() == ["a=1", "b=0.2", "c=x\\ y", "d=8", "e=0.0", "f=adam", "+g=1.0", "h=5"]
    # The command line wins over the config for the same key.
    assert search_space({"a": "range(1, 3)", "b": "interval(0, 1)"}, ["a=2"]).overrides({"b": 0.5}) == [
        "b=0.5",
        "a=2",
    ]


@pytest.mark.parametrize(
    "params, arguments, message",
    [
        (
            {"a": {"type": "beta", "low": 0, "high": 1}},
            [],
            "hydra.sweeper.params['a'].type: 'beta' is not one of",
        ),
        ({"a": {"type": "float", "low": 0}}, [], "hydra.sweeper.params['a'].high: None is not a number"),
        (
            {"a": {"type": "int", "low": 0.5, "high": 2}},
            [],
            "hydra.sweeper.params['a'].low: 0.5 is not an int",
        ),
        (
            {"a": {"type": "float", "low": 0, "high": 1, "q": 1}},
            [],
            "hydra.sweeper.params['a']: unknown key(s) ['q']",
        ),
        ({"a": {"type": "float", "low": 0, "high": 1, "log": True}}, [], "hydra.sweeper.params['a']: "),
        ({"a": {"type": "categorical", "choices": 3}}, [], "hydra.sweeper.params['a'].choices: a list"),
        ({"a": "tag(lg, interval(1, 2))"}, [], "hydra.sweeper.params['a']: unknown tag ['lg']"),
        (
            {"a": "tag(log, choice(1, 2))"},
            [],
            "hydra.sweeper.params['a']: tags ['log'] apply to interval() only",
        ),
        ({"a": "interval(2, 1)"}, [], "hydra.sweeper.params['a']: `low <= high` must hold"),
        ({"a": "range(3, 1)"}, [], "hydra.sweeper.params['a']: the range is empty"),
        ({"a": "interval(1,"}, [], "hydra.sweeper.params['a']: "),
        ({"a": 1}, ["b=2"], "hydra.sweeper.params: nothing to search"),
        ({"a": "interval(0, 1)"}, ["~b=1,2"], "command line `~b=1,2`: a deletion (~) cannot be searched"),
        ({"a": "interval(0, 1)"}, ["b=glob(*)"], "command line `b=glob(*)`: "),
        ("lr", [], "hydra.sweeper.params: a mapping"),
    ],
)
def test_a_bad_search_space_is_a_one_line_error_naming_the_key(params, arguments, message):
    with pytest.raises(UserInputError) as error:
        search_space(params, arguments)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


SETTINGS = {"direction": "maximize", "storage": None, "study_name": "s", "n_trials": 2, "n_jobs": 1}
SETTINGS["max_failure_rate"] = 0.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"direction": "up"}, "hydra.sweeper.direction: 'up' is not maximize or minimize"),
        ({"direction": ["maximize", "minimize"]}, "hydra.sweeper.direction: "),
        ({"n_trials": 0}, "hydra.sweeper.n_trials: 0 is not a whole number >= 1"),
        ({"n_jobs": "2"}, "hydra.sweeper.n_jobs: '2' is not a whole number >= 1"),
        ({"max_failure_rate": 1.5}, "hydra.sweeper.max_failure_rate: 1.5 is not a number from 0 to 1"),
        ({"storage": ""}, "hydra.sweeper.storage: '' is not null or a non-empty string"),
        ({"sampler": {"seed": 1}}, "hydra.sweeper.sampler: {'seed': 1} names no _target_"),
        (
            {"sampler": {"_target_": "collections.OrderedDict"}},
            "hydra.sweeper.sampler: collections.OrderedDict is not",
        ),
        ({"storage": "nodb://x"}, "hydra.sweeper.storage: cannot open 'nodb://x': "),
    ],
)
def test_bad_search_settings_are_one_line_errors_naming_the_key(tmp_path, change, message):
    options = {**SETTINGS, "params": {"a": "interval(0, 1)"}, **change}
    with pytest.raises(UserInputError) as error:
        prepare(options, [], tmp_path)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


class FakeLauncher:
    """Hydra's launcher as the sweeper sees it: each batch's jobs, returning what `job` gives
    (a number, or an exception that the job raised)."""

    def __init__(self, sweep_dir, job):
        self.sweep_dir, self.job, self.batches = Path(sweep_dir), job, []

    def __call__(self, batch, initial_job_idx):
        self.batches.append((initial_job_idx, [list(o) for o in batch]))
        returns = []
        for idx, overrides in enumerate(batch, start=initial_job_idx):
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
            ret.hydra_cfg = OmegaConf.create(
                {"hydra": {"runtime": {"output_dir": str(self.sweep_dir / str(idx))}}}
            )
            params = dict(o.split("=", 1) for o in overrides)
            try:
                ret.return_value = self.job(idx, params)
            except Exception as err:
                ret.status, ret.return_value = JobStatus.FAILED, err
            returns.append(ret)
        return returns


def quadratic(idx, params):
    return -((float(params["x"]) - 0.3) ** 2)


def test_the_search_asks_and_tells_in_batches_and_writes_the_best_trial(tmp_path):
    options = {**SETTINGS, "n_trials": 5, "n_jobs": 2, "params": {"x": "interval(0, 1)"}}
    options["sampler"] = {"_target_": "optuna.samplers.RandomSampler", "seed": 0}
    launcher = FakeLauncher(tmp_path, quadratic)
    study = prepare(options, ["data=synthetic"], tmp_path).run(launcher)
    assert [(idx, len(batch)) for idx, batch in launcher.batches] == [(0, 2), (2, 2), (4, 1)]
    assert all(o[-1] == "data=synthetic" for _, batch in launcher.batches for o in batch)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert [t.user_attrs["run_dir"] for t in study.trials] == [str(tmp_path / str(i)) for i in range(5)]
    for trial in study.trials:
        assert trial.value == pytest.approx(quadratic(0, {"x": trial.params["x"]}))
    results = OmegaConf.load(tmp_path / RESULTS_FILE)
    best = max(study.trials, key=lambda t: t.value)
    assert results.best_params == {"x": best.params["x"]} and results.best_value == best.value
    assert (results.best_trial, results.best_run_dir) == (best.number, str(tmp_path / str(best.number)))
    assert results.trials == {"complete": 5} and results.direction == "maximize"


def test_failed_trials_stop_the_search_beyond_max_failure_rate(tmp_path):
    def every_other(idx, params):
        if idx % 2:
            raise RuntimeError(f"run {idx} broke")
        return 0.5

    options = {**SETTINGS, "n_trials": 4, "n_jobs": 2, "params": {"x": "interval(0, 1)"}}
    # Half of each batch fails: tolerated at 0.5, not at 0.4 (the first failure's error).
    tolerant = {**options, "max_failure_rate": 0.5}
    study = prepare(tolerant, [], tmp_path / "a").run(FakeLauncher(tmp_path, every_other))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL] * 2
    search = prepare({**options, "max_failure_rate": 0.4}, [], tmp_path / "b")
    with pytest.raises(RuntimeError, match="run 1 broke"):
        search.run(FakeLauncher(tmp_path, every_other))
    assert [t.state for t in search.study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert OmegaConf.load(tmp_path / "b" / RESULTS_FILE).trials == {"complete": 1, "fail": 1}
    # A run that returns no number (NaN, None) failed too; a search where none completed fails.
    search = prepare({**options, "n_jobs": 1}, [], tmp_path / "c")
    with pytest.raises(SweepFailed, match=r"trial 0 \(.*0\) returned nan, not a number to maximize"):
        search.run(FakeLauncher(tmp_path, lambda idx, params: float("nan")))
    search = prepare({**options, "max_failure_rate": 1.0}, [], tmp_path / "d")
    with pytest.raises(SweepFailed, match="no trial of Optuna study 's' completed"):
        search.run(FakeLauncher(tmp_path, lambda idx, params: None))
    assert [t.state for t in search.study.trials] == [TrialState.FAIL] * 4
    assert not (tmp_path / "d" / RESULTS_FILE).exists()


def test_a_run_that_exits_leaves_no_trial_running(tmp_path):
    def bad_input(batch, initial_job_idx):
        raise SystemExit(2)  # what train.py does on bad input, in the launching process

    search = prepare({**SETTINGS, "n_jobs": 2, "params": {"x": "interval(0, 1)"}}, [], tmp_path)
    with pytest.raises(SystemExit):
        search.run(bad_input)
    assert [t.state for t in search.study.trials] == [TrialState.FAIL] * 2


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_stored_study_is_continued_by_the_next_sweep(tmp_path, kind):
    storage = str(tmp_path / "s.journal") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    options = {**SETTINGS, "storage": storage, "params": {"x": "interval(0, 1)"}}
    options["sampler"] = {"_target_": "optuna.samplers.RandomSampler", "seed": 7}
    first = prepare(options, [], tmp_path / "first").run(FakeLauncher(tmp_path / "first", quadratic))
    second = prepare(options, [], tmp_path / "second")  # a new process would open it the same way
    assert len(second.study.trials) == 2
    second.run(FakeLauncher(tmp_path / "second", quadratic))
    assert [t.number for t in second.study.trials] == [0, 1, 2, 3]
    # The seeded sampler does not replay the first sweep's trials (seed + trials so far).
    assert len({t.params["x"] for t in second.study.trials}) == 4
    assert [Path(t.user_attrs["run_dir"]).parent.name for t in second.study.trials] == ["first"] * 2 + [
        "second"
    ] * 2
    results = OmegaConf.load(tmp_path / "second" / RESULTS_FILE)
    assert results.trials == {"complete": 4} and results.storage == storage
    assert results.best_value == max(t.value for t in second.study.trials) >= first.best_value
    # The summary names the best run, which may be one of the earlier sweep.
    write_sweep_summary(tmp_path / "second")
    best_dir = Path(results.best_run_dir)
    shown = best_dir.name if best_dir.parent.name == "second" else str(best_dir)
    markdown = (tmp_path / "second" / "sweep_summary.md").read_text()
    assert f"best value {results.best_value:.4f} (run `{shown}`) with x=" in markdown
    with pytest.raises(
        UserInputError, match=r"^hydra.sweeper.direction: study 's' in .* is to maximize, not minimize$"
    ):
        prepare({**options, "direction": "minimize"}, [], tmp_path / "third")
