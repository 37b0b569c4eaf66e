"""Evaluate a trained checkpoint on the data it was trained on; compare runs; tabulate runs.

    python evaluate.py ckpt_path=RUN/checkpoints/best.ckpt [split=val|test] [data_path=FILE]
    python evaluate.py ckpt_path=RUN/checkpoints/best.ckpt strategy=ddp devices=2 [accelerator=cpu]
    python evaluate.py compare=[RUN_A,RUN_B,...] [compare_metrics=[ndcg@10,hr@10]]
    python evaluate.py table=[RUN_A,RUN_B,...] [table_metrics=[test/ndcg@10,...]]
    python evaluate.py interleave=[RUN_A,RUN_B] [interleave_metric=ndcg@10]
    python evaluate.py plan=[RUN_A,RUN_B] [plan_metric=ndcg@10] [plan_cuped=true plan_pre_period=RUN_A_VAL]

compare: paired statistics of the runs' per-user results against the first (recsys/evaluation/compare.py),
written as comparison.md and comparison.csv. table: one row per run (recsys/evaluation/tables.py), written
as results.md, results.csv and results.tex. interleave: offline team-draft interleaving of two runs'
top-K lists (recsys/evaluation/interleaving.py), written as interleave.md and interleave.csv. plan:
the online A/B test that would follow (recsys/evaluation/planning.py), written as plan.md and
plan.csv. Each mode writes into hydra.run.dir.

Rebuilds the data from the run's saved config.yaml, refuses a checkpoint whose data fingerprint
differs from that data's, evaluates with the same code as train.py's test step, and writes
metrics.json and per_user.parquet into its own output directory (hydra.run.dir). With several
processes each evaluates its share of the users; rank 0 writes the files.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys.data.split import SPLITS
from recsys.errors import UserInputError
from recsys.evaluation.compare import (
    check_paired,
    compare_runs,
    comparison_markdown,
    load_run,
    paired_t_pvalue,
    target_column,
)
from recsys.evaluation.debiased import check_gamma, debiased_metrics
from recsys.evaluation.interleaving import (
    TOP_ITEMS_COLUMN,
    check_has_top_items,
    interleave_credit,
    interleaving_markdown,
    preference_summary,
    smallest_sufficient,
    users_needed,
)
from recsys.evaluation.metrics import check_seen_items
from recsys.evaluation.planning import ab_plan, plan_markdown
from recsys.evaluation.results import restrict_to_slice, write_test_results
from recsys.evaluation.seeds import average_over_seeds, seed_summary
from recsys.evaluation.tables import format_table, results_table, to_markdown, write_tables
from recsys.models.from_config import build_model, data_info
from recsys.runs.files import atomic_path, run_with_user_errors, write_json_atomic
from recsys.serving.recommend import check_same_data, load_checkpoint, load_run_config
from recsys.training.distributed import check_trainer_options, trainer_errors
from recsys.training.hardware import check_precision

OmegaConf.register_new_resolver("project_root", lambda: str(Path(__file__).resolve().parent), replace=True)


def evaluate(cfg: DictConfig, out_dir: Path) -> dict:
    if cfg.split not in SPLITS:
        raise UserInputError(f"split: {cfg.split!r} is not one of {list(SPLITS)}")
    ckpt_path = Path(cfg.ckpt_path).resolve()
    checkpoint = load_checkpoint(ckpt_path)
    run_cfg = load_run_config(ckpt_path, cfg.run_dir)
    options = OmegaConf.to_container(cfg, resolve=False)  # plain values (devices may be a list)
    options = {key: options[key] for key in ("strategy", "accelerator", "devices", "num_nodes")}
    # The data module deals each process its users (once each); Lightning's sampler would pad.
    options["use_distributed_sampler"] = False
    check_trainer_options(options, prefix="")  # before any data is read
    if cfg.data_path is not None:
        run_cfg.data.path = cfg.data_path
    run_cfg.data.cache_dir = cfg.paths.cache_dir
    if cfg.batch_size is not None:
        run_cfg.data.eval_batch_size = cfg.batch_size
    seen_items = cfg.evaluation.seen_items
    if seen_items == "as_trained":  # runs from before the key existed get the default
        seen_items = run_cfg.get("evaluation", {}).get("seen_items", "exclude")
    seen_items = check_seen_items(seen_items)
    ips_gamma = check_gamma(cfg.evaluation.get("ips_gamma"))
    targets = cfg.evaluation.get("targets", "as_trained")
    if targets == "as_trained":
        targets = run_cfg.get("evaluation", {}).get("targets", "next")
    evaluation = OmegaConf.merge(cfg.evaluation, {"targets": targets})
    cold_items_share = cfg.evaluation.get("cold_items_share", "as_trained")
    if cold_items_share == "as_trained":  # the items the checkpoint was trained without
        cold_items_share = run_cfg.get("evaluation", {}).get("cold_items_share")
    if cfg.exclude_events != "as_trained":  # e.g. all seen items instead of bought ones only
        run_cfg.data.exclude_events = None if cfg.exclude_events == "all" else cfg.exclude_events

    datamodule = instantiate(
        run_cfg.data,
        seen_items=seen_items,
        max_users=cfg.evaluation.get("max_users"),
        cold_items=cfg.evaluation.get("cold_items", "drop"),
        cold_items_share=cold_items_share,
        targets=targets,
    )
    check_same_data(ckpt_path, checkpoint.get("data_fingerprint"), datamodule, run_cfg.data.path)
    datamodule.prepare_data()
    datamodule.setup("test")
    data = replace(
        data_info(datamodule),
        num_items=int(checkpoint["num_items"]),
        num_event_types=int(checkpoint.get("num_event_types", 0)),
    )
    model = build_model(run_cfg, data, evaluation=evaluation)
    model.load_state_dict(checkpoint["state_dict"])

    precision = check_precision(cfg.precision, cfg.accelerator)
    with trainer_errors(options, prefix=""):
        trainer = pl.Trainer(
            **options,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    datamodule.test_split = cfg.split  # trainer.test then evaluates every user on this split
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    metrics = {
        f"{cfg.split}/{k.split('/', 1)[1]}": float(v) for k, v in results.items() if k.startswith("test/")
    }
    summary = {
        **metrics,
        "ckpt_path": str(ckpt_path),
        "split": cfg.split,
        "epoch": int(checkpoint.get("epoch", -1)),
        "data": run_cfg.data.name,
        "data_fingerprint": datamodule.fingerprint,
        "exclude_seen": datamodule.exclude_events if datamodule.exclude_events is not None else True,
        "seen_items": seen_items,
        "targets": targets,
        "ips_gamma": ips_gamma,
        **datamodule.evaluation_counts(cfg.split),
        "protocol": datamodule.protocol(),
    }
    if not trainer.is_global_zero:
        return summary  # every process holds the same results; rank 0 writes them
    frame = write_test_results(datamodule, cfg.split, model, out_dir, ips_gamma)
    if ips_gamma is not None:
        summary.update(debiased_metrics(frame, cfg.split))
    write_json_atomic(out_dir / "metrics.json", summary)
    print(
        f"\n{cfg.split} metrics of {ckpt_path} ({run_cfg.data.name}, {len(frame)} users), written to {out_dir}"
    )
    print(format_table(summary, cfg.split, model.ks))
    return summary


def compare(cfg: DictConfig, out_dir: Path) -> dict:
    slice_name = cfg.get("compare_slice")
    runs = [load_run(path) for path in cfg.compare]
    runs = restrict_to_slice(runs, slice_name, same_users=not cfg.average_seeds)
    metrics = list(cfg.compare_metrics)
    seeds = seed_summary(runs, metrics, cfg.confidence)
    if cfg.average_seeds:  # compare variants: each user's metrics averaged over a variant's seeds
        runs = average_over_seeds(runs, partial_users=slice_name is not None)
    table = compare_runs(runs, metrics, cfg.confidence, cfg.bootstrap_samples, cfg.seed)
    markdown = comparison_markdown(table, seeds, cfg.confidence)
    if slice_name:
        markdown = f"Users with {slice_name} targets only (compare_slice={slice_name}).\n\n{markdown}"
    with atomic_path(out_dir / "comparison.csv") as tmp:
        table.to_csv(tmp, index=False)
    if len(seeds):
        with atomic_path(out_dir / "comparison_seeds.csv") as tmp:
            seeds.to_csv(tmp, index=False)
    with atomic_path(out_dir / "comparison.md") as tmp:
        tmp.write_text(markdown)
    print(markdown + f"\nwritten to {out_dir}")
    return {"runs": len(runs)}


def tabulate(cfg: DictConfig, out_dir: Path) -> dict:
    table = results_table(list(cfg.table), list(cfg.table_metrics))
    write_tables(table, out_dir)
    print(to_markdown(table) + f"\nwritten to {out_dir} (results.md, results.csv, results.tex)")
    return {"runs": len(table)}


def interleave(cfg: DictConfig, out_dir: Path) -> dict:
    if len(cfg.interleave) != 2:
        raise UserInputError(f"interleave: give two runs, [A,B], got {len(cfg.interleave)}")
    runs = [load_run(path, key="interleave") for path in cfg.interleave]
    for run in runs:
        check_has_top_items(run.per_user.columns, run.path)
    check_paired(runs, key="interleave")
    metric = cfg.interleave_metric
    if any(metric not in run.per_user.columns for run in runs):
        raise UserInputError(f"interleave_metric: no per-user column {metric!r} in both runs")
    a, b = (run.per_user for run in runs)
    credit = interleave_credit(a[TOP_ITEMS_COLUMN], b[TOP_ITEMS_COLUMN], a[target_column(a)], seed=cfg.seed)
    summary = preference_summary(credit, cfg.confidence)
    differences = b[metric].to_numpy(float) - a[metric].to_numpy(float)
    # Up to four times the test users, resampled: "how many users would it take" may exceed them.
    sizes = np.unique(np.round(np.geomspace(min(20, len(a)), 4 * len(a), 24)).astype(int))
    table = users_needed(credit, differences, cfg.plan_alpha, sizes, cfg.interleave_repetitions, cfg.seed)
    sufficient = smallest_sufficient(table, cfg.plan_power)
    paired = {"diff": float(differences.mean()), "pvalue": paired_t_pvalue(a[metric], b[metric])}
    markdown = interleaving_markdown(
        summary,
        table,
        sufficient,
        runs[0].name,
        runs[1].name,
        metric,
        paired,
        cfg.plan_power,
        cfg.plan_alpha,
        cfg.confidence,
    )
    with atomic_path(out_dir / "interleave.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_dir / "interleave.md") as tmp:
        tmp.write_text(markdown)
    write_json_atomic(
        out_dir / "interleave.json", {**summary, **{f"users_needed_{k}": v for k, v in sufficient.items()}}
    )
    print(markdown + f"\nwritten to {out_dir}")
    return summary


def plan(cfg: DictConfig, out_dir: Path) -> dict:
    if len(cfg.plan) != 2:
        raise UserInputError(f"plan: give two runs, [A,B], got {len(cfg.plan)}")
    runs = [load_run(path, key="plan") for path in cfg.plan]
    check_paired(runs, key="plan")
    metric = cfg.plan_metric
    if any(metric not in run.per_user.columns for run in runs):
        raise UserInputError(f"plan_metric: no per-user column {metric!r} in both runs")
    pre = None
    if cfg.plan_cuped:
        if cfg.plan_pre_period is None:
            raise UserInputError(
                "plan_pre_period: plan_cuped=true needs the pre-period per-user results, e.g. "
                "evaluate.py ckpt_path=<A's checkpoint> split=val (a time split's validation window)"
            )
        pre_run = load_run(cfg.plan_pre_period, key="plan_pre_period")
        if metric not in pre_run.per_user.columns:
            raise UserInputError(f"plan_pre_period: no per-user column {metric!r} in {pre_run.path}")
        # Test users without a pre-period event get NaN: CUPED leaves them unadjusted (counted).
        pre = (
            pre_run.per_user.set_index("user_id")[metric]
            .reindex(runs[0].per_user["user_id"])
            .to_numpy(dtype=float)
        )
    elif cfg.plan_pre_period is not None:
        raise UserInputError("plan_pre_period: only read with plan_cuped=true")
    a, b = (run.per_user[metric].to_numpy(dtype=float) for run in runs)
    result = ab_plan(a, b, cfg.plan_alpha, cfg.plan_power, cfg.plan_users_per_arm, pre)
    markdown = plan_markdown(result, metric, runs[0].name, runs[1].name)
    with atomic_path(out_dir / "plan.csv") as tmp:
        result.table().to_csv(tmp, index=False)
    with atomic_path(out_dir / "plan.md") as tmp:
        tmp.write_text(markdown)
    print(markdown + f"\nwritten to {out_dir}")
    return {"users": len(a)}


MODES = {
    "ckpt_path": evaluate,
    "compare": compare,
    "table": tabulate,
    "interleave": interleave,
    "plan": plan,
}


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    chosen = [key for key in MODES if cfg.get(key)]

    def run() -> dict:
        if len(chosen) != 1:
            raise UserInputError(
                "evaluate.py: give exactly one of ckpt_path=CKPT, compare=[RUN,...], table=[RUN,...], "
                "interleave=[RUN_A,RUN_B], plan=[RUN_A,RUN_B]"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        return MODES[chosen[0]](cfg, out_dir)

    run_with_user_errors(out_dir, run)


if __name__ == "__main__":
    main()
