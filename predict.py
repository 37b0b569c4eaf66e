"""Recommendations from a trained checkpoint, in original item ids; export of the scoring model.

    python predict.py ckpt_path=RUN/checkpoints/best.ckpt [k=100] [split=test|val|next]
    python predict.py ckpt_path=... sessions=sessions.jsonl [k=20]
    python predict.py ckpt_path=... export=[torchscript,onnx] [k=100]

Users of the data: recommendations.parquet with columns user, rank (1-based), item, score, for
every user, from the history the split's evaluation uses (test: the rank of each user's test item
here is the rank evaluate.py reports, up to the order of tied scores), seen items excluded unless
exclude_seen=false; written a batch of users at a time, atomically. New sessions: the same file with
a session column instead of user, plus fallback (empty session: most popular items) and
unknown_items (ids not in the catalogue, skipped). Export: model.ts / model.onnx and item_ids.json
in the output directory (recsys/serving/export.py). Output goes to hydra.run.dir unless output= says where.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys.errors import UserInputError
from recsys.runs.files import atomic_path, run_with_user_errors
from recsys.serving.recommend import HISTORY_SPLITS, Recommender, check_same_data
from recsys.serving.sessions import read_sessions

OmegaConf.register_new_resolver("project_root", lambda: str(Path(__file__).resolve().parent), replace=True)


def output_path(cfg: DictConfig, out_dir: Path) -> Path:
    path = Path(cfg.output) if cfg.output else out_dir / "recommendations.parquet"
    if path.exists() and not cfg.overwrite:
        raise UserInputError(f"output: {path} already exists; choose another path or set overwrite=true")
    return path


def predict(cfg: DictConfig, out_dir: Path) -> dict:
    if not cfg.ckpt_path:
        raise UserInputError("ckpt_path: required (RUN/checkpoints/<name>.ckpt)")
    if cfg.batch_size < 1:
        raise UserInputError(f"batch_size: must be >= 1, got {cfg.batch_size}")
    if cfg.split not in HISTORY_SPLITS:
        raise UserInputError(f"split: {cfg.split!r} is not one of {list(HISTORY_SPLITS)}")
    recommender = Recommender.from_checkpoint(cfg.ckpt_path, cfg.run_dir, cfg.device, cfg.item_chunk_size)
    if cfg.item_features:
        recommender.add_items(cfg.item_features)
    recommender.check_k(cfg.k)

    if cfg.export:
        from recsys.serving.export import export_model

        written = export_model(
            recommender.network,
            cfg.k,
            out_dir,
            formats=list(cfg.export),
            item_ids=recommender.item_ids,
            overwrite=cfg.overwrite,
            item_table=recommender.item_table(),
        )
        for fmt, path in written.items():
            print(f"{fmt}: {path}")
        return {"exported": {fmt: str(path) for fmt, path in written.items()}}

    path = output_path(cfg, out_dir)
    if cfg.sessions:
        sessions, histories = read_sessions(cfg.sessions)
        frame = recommender.recommend(histories, cfg.k, cfg.exclude_seen, sessions, cfg.batch_size)
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
        unknown = int(frame.drop_duplicates("session")["unknown_items"].sum()) if len(frame) else 0
        fallback = int(frame.drop_duplicates("session")["fallback"].sum()) if len(frame) else 0
        print(
            f"top-{cfg.k} for {len(sessions)} sessions written to {path} "
            f"({unknown} unknown item ids skipped, {fallback} sessions fell back to popularity)"
        )
        return {"rows": len(frame)}

    data_config = recommender.model.data_config
    if cfg.data_path is not None:
        data_config.path = cfg.data_path
    data_config.cache_dir = cfg.paths.cache_dir
    datamodule = instantiate(data_config)
    if datamodule.protocol_name != "leave_one_out" and cfg.split != "next":
        # Its targets and candidates follow the cuts (and its cold items): evaluate.py's job.
        raise UserInputError(
            f"split: {cfg.split!r} of a run with data.split={datamodule.protocol_name!r} is evaluate.py's; "
            "predict.py recommends split=next from every user's whole history"
        )
    check_same_data(cfg.ckpt_path, recommender.model.data_fingerprint, datamodule, data_config.path)
    datamodule.setup()
    rows = recommender.recommend_users(
        datamodule.data, cfg.split, cfg.k, path, cfg.exclude_seen, cfg.batch_size
    )
    print(f"top-{cfg.k} ({cfg.split} histories) for {datamodule.data.num_users} users written to {path}")
    return {"rows": rows}


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    run_with_user_errors(out_dir, lambda: predict(cfg, out_dir))


if __name__ == "__main__":
    main()
