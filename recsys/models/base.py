"""What every sequential model shares: optimizer set-up and evaluation under the one protocol.

A model subclasses `SequentialRecommender`, builds its network in `__init__`, and implements
`training_step` and `score(history) -> (B, num_items + 1)`. Validation and test then rank every item
for every user through `recsys.metrics`, identically for all models.

Several processes (`trainer=ddp`): each process ranks its own users (the data module deals them out,
each exactly once); the metric sums and user counts are all-reduced at epoch end, so the means are
the same as one process would get, and the per-user ranks of the test are gathered from all
processes (`test_results`, sorted by user, on every rank).

train.py calls `check_options(model_config, loss)` before it reads any data, so that a bad option
(a loss the model cannot use, a probability out of range) fails in a second, not after the data has
been preprocessed. A model with options of its own to check extends it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from recsys.errors import UserInputError
from recsys.hardware import skip_cudnn_attention, with_fused
from recsys.losses import check_catalogue
from recsys.metrics import (
    DEFAULT_KS,
    ListMetrics,
    RankingMetrics,
    check_ks,
    chunked_ranking,
    sample_unseen,
    sampled_target_ranks,
    target_ranks,
    top_k_items,
)

OptimizerFactory = Callable[..., torch.optim.Optimizer]

# Lightning advises sync_dist=True for epoch-level logs under DDP (a mean of per-process values);
# the val/ and test/ metrics are logged already reduced exactly over all processes, so the advice,
# repeated for each metric, does not apply.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self\.log\('(val|test)/.*sync_dist=True"
)


def keep_last_items(history: torch.Tensor, max_len: int) -> torch.Tensor:
    """Each right-padded row's last `max_len` real items, still right-padded."""
    if history.size(1) <= max_len:
        return history
    lengths = (history != 0).sum(dim=1, keepdim=True)
    index = (lengths - max_len).clamp(min=0) + torch.arange(max_len, device=history.device)
    return history.gather(1, index.clamp(max=history.size(1) - 1)) * (index < lengths)


def target_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) bool: training positions with a next item, and, where the data module restricts the
    targets to some event types (`target_mask`), whose next event is of one of them."""
    has_target = batch["target_ids"] != 0
    if "target_mask" in batch:
        has_target = has_target & batch["target_mask"]
    return has_target


def flat_positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of `mask` (B, L) into its flattened B * L positions, row by row.

    Index (B, L, ...) tensors with them (`x.flatten(0, 1)[index]`) rather than with the mask: every
    boolean indexing, and every count of the mask, waits for the device to say how many entries are
    True (a device-to-host sync that drains a GPU's queue of kernels), where this waits once, and
    the count is `len(index)`. Same rows in the same order as `x[mask]`."""
    return mask.flatten().nonzero().squeeze(1)


def position_ids(input_ids: torch.Tensor, from_end: bool) -> torch.Tensor:
    """(B, L) position of each column of right-padded `input_ids`: 0 at the first column, or, with
    `from_end`, 0 at each row's last real (non-padding) column, counting up towards the start
    (padding columns get 0; their outputs are never used)."""
    positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
    if not from_end:
        return positions
    lengths = (input_ids != 0).sum(dim=1, keepdim=True)
    return (lengths - 1 - positions).clamp(min=0)


def last_real_position(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, d) at each right-padded row's last real item: (B, d)."""
    last = (input_ids != 0).sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(input_ids.size(0), device=input_ids.device), last]


class SequentialRecommender(pl.LightningModule):
    # False for models that are not trained by gradient descent (e.g. most-popular).
    uses_loss: ClassVar[bool] = True

    @classmethod
    def check_options(cls, options: Mapping[str, Any], loss: nn.Module | None) -> None:
        """Raise UserInputError for model options that cannot work; runs before data is loaded."""
        name = cls.__name__
        if cls.uses_loss and loss is None:
            raise UserInputError(
                f"loss: {name} is trained with a loss; choose one of loss=ce|sampled_softmax|bce|gbce"
            )
        if not cls.uses_loss and loss is not None:
            raise UserInputError(f"loss: {name} has nothing to train and cannot use a loss; set loss=none")

    def __init__(
        self,
        num_items: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable | None = None,
        scheduler_interval: str = "epoch",
        data_fingerprint: str = "",
        ks: Sequence[int] = DEFAULT_KS,
        weight_batches_by_targets: bool = True,
    ):
        super().__init__()
        self.num_items = num_items
        self.weight_batches_by_targets = weight_batches_by_targets
        # Target positions and batches trained on so far (this process, since the model was built
        # or loaded), for the running mean of targets per batch in _training_loss.
        self._targets_seen = 0
        self._batches_seen = 0
        # Factories (Hydra `_partial_: true`), kept out of the checkpoint's hyper-parameters so that
        # checkpoints hold only tensors and plain values and load with weights_only=True.
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-3)
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.data_fingerprint = data_fingerprint
        self.ks = tuple(ks)
        check_ks(self.ks, num_items)
        self.val_metrics = RankingMetrics(self.ks)
        self.test_metrics = RankingMetrics(self.ks)
        # Set by configure_evaluation (train.py / evaluate.py); tests of the model need neither.
        self.list_metrics: ListMetrics | None = None
        self.sampled_evaluation: dict | None = None
        self.sampled_metrics = RankingMetrics(self.ks)
        # {"item_ids", "train_item_counts"} of the training data, set by build_model; checkpointed.
        self.catalogue: dict | None = None
        # Items scored at a time in evaluation: B x this many float32 scores, whatever the catalogue.
        self.ranking_chunk_size = 65536
        # {"user", "rank"} of every user of the last test pass, from all processes, sorted by user.
        self.test_results: dict[str, torch.Tensor] = {}
        self._test_users: list[torch.Tensor] = []
        self._test_ranks: list[torch.Tensor] = []

    def _set_loss(self, loss: nn.Module | None) -> None:
        self.check_options({}, loss)
        if loss is not None:
            check_catalogue(loss, self.num_items)
        self.loss = loss

    def _training_loss(self, loss: torch.Tensor, targets: int) -> torch.Tensor:
        """Log a batch's mean loss over its `targets` target positions and return what to minimise.

        With weight_batches_by_targets, that is the mean times targets / (running mean of targets
        per batch): every target position then weighs the same in an epoch, however batches are
        formed. Why: length bucketing batches short histories together, so a batch may hold 256
        targets or 6,000; with plain batch means a short history's targets weighed ~20x a long
        one's, and SASRec lost 10-15% validation NDCG@10 on the Amazon sets (RESULTS.md, "Batches
        weighted by their target count").
        Dividing by the running mean, not a constant, keeps the average weight at 1, so learning
        rates tuned either way still fit."""
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=targets)
        if not self.weight_batches_by_targets:
            return loss
        self._targets_seen += targets
        self._batches_seen += 1
        return loss * (targets * self._batches_seen / max(self._targets_seen, 1))

    # --- the part each model provides -----------------------------------------------------------

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """(B, d) vectors whose dot products with `item_vectors()` score every item as the next one
        after right-padded `history`. Models that score this way are ranked a chunk of items at a
        time (bounded memory at any catalogue size); others override `score` instead."""
        raise NotImplementedError(f"{type(self).__name__} must implement user_vectors or score")

    def item_vectors(self) -> torch.Tensor:
        """(num_items + 1, d) vectors of padding (row 0) and the items."""
        raise NotImplementedError(f"{type(self).__name__} must implement item_vectors or score")

    def score(self, history: torch.Tensor, **features: torch.Tensor) -> torch.Tensor:
        """Scores (B, num_items + 1) of every item as the next one after right-padded `history`
        (and, for a model that reads them, the `history_features`)."""
        return self.user_vectors(history, **features) @ self.item_vectors().T

    @property
    def reads_events(self) -> bool:
        """True for a model built to read event types or time gaps (recsys/models/events.py):
        evaluation then hands it the history's `events`, `gaps` and the `target_event` type."""
        behaviour = getattr(self, "behaviour", None)  # a model's BehaviourEmbedding, if it has one
        return behaviour is not None and behaviour.active

    def history_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.reads_events:
            return {}
        return {
            "events": batch["history_events"],
            "gaps": batch["history_gaps"],
            "target_event": batch["target_event"],
        }

    @property
    def scores_by_dot_product(self) -> bool:
        return type(self).user_vectors is not SequentialRecommender.user_vectors

    # --- optimisation ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        skip_cudnn_attention()  # its per-shape planning stalls every new batch width (hardware.py)
        # DDP wraps the model to all-reduce gradients, and refuses a model with nothing to train.
        if (
            stage == "fit"
            and self.trainer.world_size > 1
            and not any(p.requires_grad for p in self.parameters())
        ):
            raise UserInputError(
                f"trainer.strategy: {type(self).__name__} has nothing to train in {self.trainer.world_size} "
                "processes; train it in one (trainer=default), then evaluate.py strategy=ddp runs in several"
            )

    def configure_optimizers(self):
        # On a GPU, AdamW's fused kernel: one launch per step instead of several per parameter.
        factory = with_fused(self.optimizer_factory, self.device.type == "cuda")
        optimizer = factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # evaluate.py refuses a checkpoint whose data differs from the data it is evaluated on.
        checkpoint["data_fingerprint"] = self.data_fingerprint
        checkpoint["num_items"] = self.num_items
        if self.catalogue is not None:
            # Original item ids (index -> id, 0 = padding) and training counts: enough to
            # recommend in original ids, popularity fallback included, without the data.
            ids = np.asarray(self.catalogue["item_ids"])
            checkpoint["item_ids"] = (
                torch.from_numpy(ids.astype(np.int64)) if ids.dtype.kind in "iu" else [str(i) for i in ids]
            )
            checkpoint["train_item_counts"] = torch.as_tensor(self.catalogue["train_item_counts"])
        checkpoint["num_event_types"] = int(getattr(self, "num_event_types", 0))
        # So that a resumed run weighs its batches exactly as the uninterrupted run would have.
        checkpoint["targets_seen"] = self._targets_seen
        checkpoint["batches_seen"] = self._batches_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._targets_seen = int(checkpoint.get("targets_seen", 0))
        self._batches_seen = int(checkpoint.get("batches_seen", 0))

    # --- evaluation ------------------------------------------------------------------------------

    def configure_evaluation(
        self,
        item_counts: torch.Tensor | None = None,
        sampled: dict | None = None,
        item_chunk_size: int | None = None,
    ) -> None:
        """What the test pass measures besides the full-ranking metrics of the target.

        item_counts: training counts of the items, for coverage, ARP and novelty of the top-K lists.
        sampled: {num_negatives, sampler: uniform|popularity, seed} to also rank the target among
        sampled unseen items, reported as test/sampled_<sampler>_<N>/<metric> (opt-in, see metrics.py).
        """
        self.list_metrics = ListMetrics(self.ks, item_counts) if item_counts is not None else None
        if sampled:
            sampler = sampled.get("sampler", "uniform")
            if sampler not in ("uniform", "popularity"):
                raise UserInputError(
                    f"evaluation.sampled.sampler: {sampler!r} is not one of ['uniform', 'popularity']"
                )
            if sampler == "popularity" and item_counts is None:
                raise UserInputError(
                    "evaluation.sampled.sampler: popularity sampling needs the training item counts"
                )
            num_negatives = int(sampled.get("num_negatives", 100))
            if not 1 <= num_negatives < self.num_items:
                raise UserInputError(
                    f"evaluation.sampled.num_negatives: must lie in 1..{self.num_items - 1}, got {num_negatives}"
                )
            self.sampled_evaluation = {
                "num_negatives": num_negatives,
                "sampler": sampler,
                "seed": int(sampled.get("seed", 0)),
                "probabilities": item_counts.float() + 1.0 if sampler == "popularity" else None,
            }
        else:
            self.sampled_evaluation = None

    @property
    def sampled_label(self) -> str | None:
        s = self.sampled_evaluation
        return None if s is None else f"sampled_{s['sampler']}_{s['num_negatives']}"

    def _rank(
        self, batch: dict[str, torch.Tensor], k: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
        """The targets' ranks, the top-k items (None when k is None) and a function giving the
        scores (B, n) of given items (B, n), from one pass of the model over the histories."""
        target, exclude = batch["target"], batch["exclude"]
        if self.scores_by_dot_product:
            queries = self.user_vectors(batch["history"], **self.history_features(batch)).float()
            items = self.item_vectors().float()
            ranks, top = chunked_ranking(queries, items, target, exclude, k, self.ranking_chunk_size)
            return ranks, top, lambda index: (queries[:, None, :] * items[index]).sum(dim=-1)
        scores = self.score(batch["history"], **self.history_features(batch)).float()
        top = None if k is None else top_k_items(scores, exclude, k)
        return target_ranks(scores, target, exclude), top, lambda index: scores.gather(1, index)

    def _reduce_sum(self, totals: torch.Tensor) -> torch.Tensor:
        # Called at every epoch end on every rank, also on a rank that had only an empty batch.
        if self._trainer is None or self.trainer.world_size == 1:
            return totals
        return self.trainer.strategy.reduce(totals.to(self.device), reduce_op="sum").cpu()

    def _gather_cat(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-d `values` of all ranks, concatenated in rank order (lengths may differ by rank)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        strategy = self.trainer.strategy
        # Lightning's all_gather wants equal shapes: gather the lengths, pad, gather, trim.
        lengths = strategy.all_gather(torch.tensor([len(values)], device=self.device)).reshape(-1).tolist()
        padded = values.new_zeros(max(1, *lengths))  # never 0-sized: some backends refuse it
        padded[: len(values)] = values
        gathered = strategy.all_gather(padded.to(self.device)).reshape(len(lengths), -1).cpu()
        return torch.cat([row[:n] for row, n in zip(gathered, lengths)])

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch["target"].numel() == 0:  # a process's empty share (see recsys/data/datamodule.py)
            return
        self.val_metrics.update(self._rank(batch, None)[0])

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute(self._reduce_sum)
        # Already reduced exactly across processes above, so no sync_dist averaging here.
        self.log_dict({f"val/{name}": value for name, value in results.items()}, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        self.sampled_metrics.reset()
        if self.list_metrics is not None:
            self.list_metrics.reset()
        self._test_users, self._test_ranks = [], []

    def _batch_generator(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Generator:
        """The generator of a batch's sampled negatives, seeded by evaluation.sampled.seed and the
        batch's first user: the same negatives in every pass, whichever process ranks the batch."""
        seed = np.random.SeedSequence([self.sampled_evaluation["seed"], int(batch["user"][0])])
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed.generate_state(1)[0]))
        return generator

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch["target"].numel() == 0:  # a process's empty share (see recsys/data/datamodule.py)
            return
        k = max(self.ks) if self.list_metrics is not None else None
        ranks, top, scores_of = self._rank(batch, k)
        self.test_metrics.update(ranks)
        if self.list_metrics is not None:
            self.list_metrics.update(top)
        if self.sampled_evaluation is not None:
            settings = self.sampled_evaluation
            probabilities = settings["probabilities"]
            negatives = sample_unseen(
                batch["target"],
                batch["exclude"],
                self.num_items,
                settings["num_negatives"],
                self._batch_generator(batch, ranks.device),
                None if probabilities is None else probabilities.to(ranks.device),
            )
            self.sampled_metrics.update(
                sampled_target_ranks(scores_of(batch["target"][:, None]), scores_of(negatives))
            )
        self._test_users.append(batch["user"].cpu())
        self._test_ranks.append(ranks.cpu())

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute(self._reduce_sum)
        if self.list_metrics is not None:
            results.update(self.list_metrics.compute(self._reduce_sum))
        if self.sampled_evaluation is not None:
            sampled = self.sampled_metrics.compute(self._reduce_sum)
            results.update({f"{self.sampled_label}/{name}": value for name, value in sampled.items()})
        self.log_dict({f"test/{name}": value for name, value in results.items()}, sync_dist=False)
        local_users = torch.cat(self._test_users) if self._test_users else torch.zeros(0, dtype=torch.long)
        local_ranks = torch.cat(self._test_ranks) if self._test_ranks else torch.zeros(0, dtype=torch.long)
        users, ranks = self._gather_cat(local_users), self._gather_cat(local_ranks)
        order = torch.argsort(users, stable=True)
        users, ranks = users[order], ranks[order]
        if len(users) > 1 and bool((users[1:] == users[:-1]).any()):
            raise RuntimeError("test: a user was evaluated more than once (duplicated across processes)")
        self.test_results = {"user": users, "rank": ranks}
