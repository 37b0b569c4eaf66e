"""Sweeps as a user runs them: a grid through submitit's local executor (the SLURM launcher's code
path on one machine) whose runs are preempted, requeued and resumed, an Optuna search, a failed run,
the sbatch script the SLURM launcher submits, an unknown launcher; and the sweep summary and the
callback of recsys/sweeps.py on their own."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf

from recsys.sweeps import OVERRIDES_FILE, SweepSummary, main, sweep_table, write_sweep_summary
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
    # hydra.mode is MULTIRUN in the config: no -m needed. A searched key given on the command line
    # (model.dim, model.num_blocks) is fixed, not searched.
    overrides = tiny_sweep(tmp_path, sweep_dir, "model.num_blocks=1")
    run("train.py", "+hparams_search=sasrec_optuna", "hydra.sweeper.n_trials=2", *overrides)
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert set(results.best_params) == {"model.optimizer.lr", "model.dropout", "model.optimizer.weight_decay"}
    table, markdown = read_summary(sweep_dir)
    assert len(table) == 2 and (table["status"] == "completed").all()
    # What Optuna maximised is what train.py wrote: val/ndcg@10 of the best run.
    assert results.best_value == pytest.approx(table["val/ndcg@10"].max())
    best_run = table[table["best"]].iloc[0]
    for key, value in results.best_params.items():
        assert f"{key}={value}" in best_run["overrides"]
    assert "Optuna (optimization_results.yaml): best value" in markdown


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


# --- recsys/sweeps.py on its own ----------------------------------------------------------------


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
