"""From a trained checkpoint to recommendations in original item ids.

    recommender = Recommender.from_checkpoint("RUN/checkpoints/best.ckpt")
    frame = recommender.recommend([["B0001", "B0002"], ["B0003"]], k=10)   # new sessions
    recommender.recommend_users(data, split="next", k=100, path="recommendations.parquet")

A `Recommender` is a model plus the catalogue it was trained on (original item id of each index,
training item counts), both read from the checkpoint, so new sessions need no data set. Scores are
the model's, ranked by `recsys.evaluation.metrics.chunked_top_k` (a chunk of items at a time: fixed memory at
any catalogue size) with the items of each history left out unless `exclude_seen=False`.

Histories of known users come from the data exactly as evaluation builds them (`split=test`: the
history before each user's test item, as evaluate.py ranks it; `val`: before the validation item;
`next`: the whole history, what to show the user now). New sessions are lists of original item ids:
ids the model does not know are skipped and counted; a session left empty gets the most popular
items, flagged `fallback`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf

from recsys.data.datasets import EvalUsers, gather_windows
from recsys.data.sequences import SequenceData
from recsys.data.split import EventSplit
from recsys.errors import UserInputError
from recsys.evaluation.metrics import chunked_top_k, top_k_items
from recsys.models.network import DataInfo
from recsys.runs.files import atomic_path
from recsys.serving.new_items import NewItems, checkpoint_item_features, new_item_vectors
from recsys.training.module import SequentialRecommender, upgrade_state_dict

log = logging.getLogger(__name__)

HISTORY_SPLITS = ("val", "test", "next")


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"ckpt_path: {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise UserInputError(
            f"ckpt_path: {path} cannot be read as a checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "num_items" not in checkpoint:
        raise UserInputError(f"ckpt_path: {path} is not a checkpoint written by train.py")
    checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])  # older layouts too
    return checkpoint


def check_same_data(ckpt_path: str | Path, trained_on: str | None, datamodule, data_path) -> None:
    """UserInputError unless the data module's data has the fingerprint the checkpoint was trained on
    (evaluate.py, predict.py and a checkpoint completed from its run's data all check this), checked
    before the data is preprocessed or cached: a refused run leaves nothing behind."""
    found = datamodule.source_fingerprint()
    if trained_on != found:
        raise UserInputError(
            f"ckpt_path: {ckpt_path} was trained on other data than {data_path} "
            f"(fingerprint {str(trained_on)[:12]} vs {found[:12]})"
        )


def load_run_config(ckpt_path: Path, run_dir: str | Path | None) -> DictConfig:
    run_dir = Path(run_dir) if run_dir else ckpt_path.parent.parent
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserInputError(f"run_dir: {config} not found (the config.yaml that train.py wrote)")
    return OmegaConf.load(config)


class Recommender:
    def __init__(
        self,
        model: SequentialRecommender,
        item_ids: np.ndarray,
        item_counts: torch.Tensor,
        max_len: int,
        device: str | torch.device = "cpu",
        item_chunk_size: int = 65536,
    ):
        if len(item_ids) != model.num_items + 1:
            raise UserInputError(
                f"item_ids: {len(item_ids) - 1} item ids for a model of {model.num_items} items"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.network = self.model.network
        self.item_ids = np.asarray(item_ids)
        self.item_counts = torch.as_tensor(item_counts).to(torch.float64)
        self.max_len = max_len
        self.item_chunk_size = item_chunk_size
        # Original id -> index; ids of a numeric catalogue are matched as integers.
        self.numeric_ids = self.item_ids.dtype.kind in "iu"
        self.index_of = {item: index for index, item in enumerate(self.item_ids[1:].tolist(), start=1)}
        self.new_item_vectors: torch.Tensor | None = None  # added by add_items

    @property
    def num_items(self) -> int:
        """Items the model was trained on (indices 1..num_items)."""
        return self.model.num_items

    @property
    def num_candidates(self) -> int:
        """Items it ranks: the trained ones and those added from their attributes (`add_items`)."""
        return len(self.item_ids) - 1

    def item_table(self) -> torch.Tensor:
        """(num_candidates + 1, d): the network's item vectors, then the added items' vectors."""
        table = self.network.item_vectors()
        if self.new_item_vectors is None:
            return table
        return torch.cat([table.float(), self.new_item_vectors.to(table.device)])

    def add_items(self, path: str | Path) -> NewItems:
        """Rank also the items of feature file `path` that the checkpoint never saw, from their
        attributes (recsys/serving/new_items.py); they take the indices after the catalogue's."""
        if not self.network.scores_by_dot_product:
            raise UserInputError(f"item_features: {path}: this model does not score items by their vectors")
        width = self.network.item_vectors().size(1)
        added = new_item_vectors(
            self.network,
            self.model.attribute_vocabulary,
            path,
            lambda item: self.index_of.get(self._as_catalogue_id(item)) is not None,
            width,
        )
        if self.numeric_ids and all(_is_integer(i) for i in added.item_ids):
            ids = np.asarray([int(i) for i in added.item_ids], dtype=np.int64)
            self.item_ids = np.concatenate([self.item_ids, ids])
        else:  # ids as text, the catalogue's too (a session's "12" then finds item 12)
            self.numeric_ids = False
            ids = np.asarray(added.item_ids, dtype=object)
            self.item_ids = np.concatenate([np.asarray([str(i) for i in self.item_ids], dtype=object), ids])
        self.index_of = {item: index for index, item in enumerate(self.item_ids[1:].tolist(), start=1)}
        self.item_counts = torch.cat([self.item_counts, torch.zeros(len(ids), dtype=self.item_counts.dtype)])
        vectors = added.vectors.to(self.device)
        self.new_item_vectors = (
            vectors if self.new_item_vectors is None else torch.cat([self.new_item_vectors, vectors])
        )
        log.info(
            "item_features %s: %d new items ranked from their attributes, %d without a known attribute "
            "left out, %d unknown attributes skipped, %d catalogue items kept as trained",
            path,
            len(ids),
            added.unrankable_items,
            added.unknown_attributes,
            added.known_items,
        )
        return added

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | Path,
        run_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        item_chunk_size: int = 65536,
    ) -> Recommender:
        """The model of a train.py checkpoint, rebuilt from its run's config.yaml (RUN/config.yaml
        for RUN/checkpoints/*.ckpt unless `run_dir` says otherwise). Checkpoints written before the
        catalogue was saved in them are completed from the run's data (fingerprint checked)."""
        from recsys.models.from_config import build_model  # Hydra imports stay out of light use

        ckpt_path = Path(ckpt_path).resolve()
        checkpoint = load_checkpoint(ckpt_path)
        cfg = load_run_config(ckpt_path, run_dir)
        if "item_ids" in checkpoint and "train_item_counts" in checkpoint:
            ids = checkpoint["item_ids"]
            item_ids = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=object)
            counts = checkpoint["train_item_counts"]
        else:
            datamodule = cls._run_data(cfg, checkpoint, ckpt_path)
            item_ids, counts = datamodule.data.item_ids, datamodule.train_item_counts()
        data = DataInfo(
            num_items=int(checkpoint["num_items"]),
            num_event_types=int(checkpoint.get("num_event_types", 0)),
            train_item_counts=counts,
            item_ids=item_ids,
            fingerprint=str(checkpoint.get("data_fingerprint", "")),
            # A recency popularity's counts are in the checkpoint's state, loaded below.
            recent_item_counts=lambda days: torch.zeros(int(checkpoint["num_items"]) + 1),
            item_features=checkpoint_item_features(checkpoint),
        )
        model = build_model(cfg, data, evaluation={})
        if model.network.reads_events or model.network.reads_times:
            raise UserInputError(
                f"ckpt_path: {ckpt_path} is a model that reads event types, time gaps or timestamps "
                "(model.event_embedding / model.time_gaps / model.time_bias); serving takes item "
                "histories only, so it cannot serve this model (evaluate.py can evaluate it)"
            )
        model.load_state_dict(checkpoint["state_dict"])
        model.data_config = cfg.data  # where recommend_users' data comes from by default
        return cls(model, item_ids, counts, int(cfg.data.max_len), device, item_chunk_size)

    @staticmethod
    def _run_data(cfg: DictConfig, checkpoint: dict, ckpt_path: Path):
        from hydra.utils import instantiate

        datamodule = instantiate(cfg.data)
        check_same_data(ckpt_path, checkpoint.get("data_fingerprint"), datamodule, cfg.data.get("path"))
        datamodule.setup()
        return datamodule

    # --- ranking -----------------------------------------------------------------------------------

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.num_candidates:
            raise UserInputError(f"k: must lie in 1..{self.num_candidates} (the catalogue), got {k}")

    @torch.no_grad()
    def top_k(
        self, history: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, item indices), each (B, k), after right-padded index histories (B, L); the items
        of `exclude` (default: the history itself) are left out; None = leave nothing out."""
        history = history.to(self.device)
        exclude = None if exclude is None else exclude.to(self.device)
        if self.network.scores_by_dot_product:
            queries = self.network.user_vectors(history)
            return chunked_top_k(queries, self.item_table(), exclude, k, self.item_chunk_size)
        scores = self.network.score(history).float()
        items = top_k_items(scores, exclude, k)
        return scores.gather(1, items), items

    def popular(self, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most popular items in training (ties by index), minus `exclude` (1, L)."""
        counts = self.item_counts.clone().float()[None, :]
        items = top_k_items(counts, exclude, k)
        return counts.gather(1, items), items

    # --- new sessions ------------------------------------------------------------------------------

    def encode(self, histories: Sequence[Sequence]) -> tuple[torch.Tensor, np.ndarray]:
        """Right-padded index histories (B, <= max_len) of sessions of original ids, and how many
        ids of each session were not in the catalogue (skipped)."""
        rows, unknown = [], np.zeros(len(histories), dtype=np.int64)
        for row, history in enumerate(histories):
            known = []
            for item in history:
                index = self.index_of.get(self._as_catalogue_id(item))
                if index is None:
                    unknown[row] += 1
                else:
                    known.append(index)
            rows.append(known)
        width = max([len(r) for r in rows] + [1])
        padded = torch.zeros(len(rows), width, dtype=torch.long)
        for row, known in enumerate(rows):
            padded[row, : len(known)] = torch.tensor(known, dtype=torch.long)
        return padded, unknown

    def _as_catalogue_id(self, item):
        if not self.numeric_ids:
            return str(item)
        try:
            as_int = int(item)
        except (TypeError, ValueError):
            return None  # not an id of this catalogue: counted as unknown
        return as_int if str(as_int) == str(item).strip() or isinstance(item, (int, np.integer)) else None

    def recommend(
        self,
        histories: Sequence[Sequence],
        k: int = 10,
        exclude_seen: bool = True,
        session_ids: Sequence | None = None,
        batch_size: int = 1024,
    ) -> pd.DataFrame:
        """Top-k for each session of original item ids, oldest first: columns session, rank (1-based),
        item (original id), score, fallback (empty session: most popular items), unknown_items.
        A session that has seen all but j < k items gets j rows."""
        self.check_k(k)
        session_ids = list(range(len(histories))) if session_ids is None else list(session_ids)
        frames = []
        for begin in range(0, len(histories), batch_size):
            chunk = histories[begin : begin + batch_size]
            history, unknown = self.encode(chunk)
            keys = session_ids[begin : begin + len(chunk)]
            frames.append(self._frame(history, k, exclude_seen, keys, unknown))
        if unknown_total := int(sum(f.drop_duplicates("session")["unknown_items"].sum() for f in frames)):
            log.warning("recommend: %d item ids not in the catalogue were skipped", unknown_total)
        return pd.concat(frames, ignore_index=True) if frames else _empty_frame("session")

    def _frame(self, history, k, exclude_seen, keys, unknown) -> pd.DataFrame:
        empty = (history != 0).sum(dim=1) == 0
        scores, items = self.top_k(history, k, history if exclude_seen else None)
        scores, items = scores.cpu(), items.cpu()
        if bool(empty.any()):
            popular_scores, popular_items = self.popular(k)
            scores[empty], items[empty] = popular_scores, popular_items
        return self._long_frame("session", keys, scores, items, fallback=empty.numpy(), unknown_items=unknown)

    # --- users of the data -------------------------------------------------------------------------

    def recommend_users(
        self,
        data: SequenceData,
        split: str,
        k: int,
        path: str | Path,
        exclude_seen: bool = True,
        batch_size: int = 1024,
        progress: bool = True,
    ) -> int:
        """Write top-k of every user of `data` to a parquet file (user, rank, item, score), a batch of
        users at a time (fixed memory), atomically: a failure leaves no file. Returns the row count."""
        self.check_k(k)
        if split not in HISTORY_SPLITS:
            raise UserInputError(f"split: {split!r} is not one of {list(HISTORY_SPLITS)}")
        if data.num_items != self.num_items:
            raise UserInputError(
                f"data: {data.num_items} items, but the model was trained on {self.num_items}"
            )
        if data.has_events and split != "next":
            # Their targets follow data.target_events and exclusion data.exclude_events: evaluate.py's job.
            raise UserInputError(
                f"split: {split!r} of event-typed data is evaluate.py's (next-purchase targets); "
                "predict.py recommends split=next from every user's whole history"
            )
        schema = None
        rows = 0
        batches = user_histories(data, split, self.max_len, batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=-(-data.num_users // batch_size), unit="batch", desc="recommend")
        with atomic_path(path) as tmp:
            writer = None
            try:
                for users, history, exclude in batches:
                    frame = self._user_frame(
                        history, exclude if exclude_seen else None, k, data.user_ids[users]
                    )
                    table = pa.Table.from_pandas(frame, preserve_index=False, schema=schema)
                    if writer is None:
                        schema = table.schema
                        writer = pq.ParquetWriter(tmp, schema)
                    writer.write_table(table)
                    rows += len(frame)
            finally:
                if writer is not None:
                    writer.close()
        return rows

    def _user_frame(self, history, exclude, k, users) -> pd.DataFrame:
        scores, items = self.top_k(history, k, exclude)
        return self._long_frame("user", users, scores.cpu(), items.cpu())

    def _long_frame(self, key: str, keys, scores, items, **per_key) -> pd.DataFrame:
        """One row per (key, rank) in original item ids; `per_key` columns repeated over the ranks.
        Rows of excluded items (score -inf, there when k exceeds the unseen items) are dropped."""
        k = items.size(1)
        frame = pd.DataFrame(
            {
                key: np.repeat(np.asarray(keys), k),
                "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(keys)),
                "item": self.item_ids[items.numpy().reshape(-1)],
                "score": scores.numpy().reshape(-1).astype(np.float32),
                **{name: np.repeat(values, k) for name, values in per_key.items()},
            }
        )
        keep = frame["score"].to_numpy() != -np.inf
        return frame if keep.all() else frame[keep].reset_index(drop=True)


def user_histories(
    data: SequenceData, split: str, max_len: int, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(user indices, history (B, <= max_len), all seen items (B, L)) per batch of users: for val and
    test exactly what evaluation ranks from; for next, everything each user did."""
    if split in ("val", "test"):
        users, target_pos = EventSplit(data, None).targets(split)
        queries = EvalUsers(data, users, target_pos, max_len)
        for begin in range(0, len(queries), batch_size):
            batch = queries[np.arange(begin, min(begin + batch_size, len(queries)))]
            yield batch["user"].numpy(), batch["history"], batch["exclude"]
        return
    starts, ends = data.offsets[:-1], data.offsets[1:]
    for begin in range(0, data.num_users, batch_size):
        users = np.arange(begin, min(begin + batch_size, data.num_users))
        history = gather_windows(data.items, np.maximum(starts[users], ends[users] - max_len), ends[users])
        exclude = gather_windows(data.items, starts[users], ends[users])
        yield users, torch.from_numpy(history), torch.from_numpy(exclude)


def _empty_frame(key: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            key: [],
            "rank": np.array([], np.int32),
            "item": [],
            "score": np.array([], np.float32),
            "fallback": np.array([], bool),
            "unknown_items": np.array([], np.int64),
        }
    )


def _is_integer(text: str) -> bool:
    try:
        return str(int(text)) == text.strip()
    except ValueError:
        return False
