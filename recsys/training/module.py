"""The one LightningModule: trains any network with any loss, and evaluates it under the protocol.

`SequentialRecommender(network, loss, optimizer, scheduler, ...)` owns what every model shares:
the training step (the loss of the network's queries against its item vectors, each batch
weighted by its target count), the optimizer and scheduler, the checkpoint extras and evaluation.
The network (recsys/models/network.py) holds only the model. Validation and test rank every item
for every user through `recsys.evaluation.metrics`, identically for all networks.

Several processes (`trainer=ddp`): each process ranks its own users (the data module deals them out,
each exactly once); the metric sums and user counts are all-reduced at epoch end, so the means are
the same as one process would get, and the per-user ranks of the test are gathered from all
processes (`test_results`, sorted by user, on every rank).

Checkpoints written before networks were split from this module held the network's weights at the
top level (`item_embedding.weight`); `upgrade_state_dict` moves them under `network.`, on load.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from recsys.errors import UserInputError
from recsys.evaluation.metrics import (
    DEFAULT_KS,
    ListMetrics,
    RankingMetrics,
    check_ks,
    check_targets,
    chunked_ranking,
    sample_unseen,
    sampled_target_ranks,
    target_ranks,
    top_k_items,
)
from recsys.evaluation.window_ranking import chunked_window_ranks, list_positions, window_target_ranks
from recsys.losses import check_catalogue
from recsys.models.network import DataInfo, SequenceNetwork, flat_positions
from recsys.training.hardware import skip_cudnn_attention, with_fused

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# Items scored at a time in evaluation (evaluation.item_chunk_size): B x this many float32 scores.
DEFAULT_ITEM_CHUNK_SIZE = 65536

# Lightning advises sync_dist=True for epoch-level logs under DDP (a mean of per-process values);
# the val/ and test/ metrics are logged already reduced exactly over all processes, so the advice,
# repeated for each metric, does not apply.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self\.log\('(val|test)/.*sync_dist=True"
)


def check_loss(network: type[SequenceNetwork], loss: nn.Module | None) -> None:
    """A network with something to learn needs a loss; one without cannot use one."""
    name = network.__name__
    if network.trainable and loss is None:
        raise UserInputError(
            f"loss: {name} is trained with a loss; choose one of loss=ce|sampled_softmax|bce|gbce"
        )
    if not network.trainable and loss is not None:
        raise UserInputError(f"loss: {name} has nothing to train and cannot use a loss; set loss=none")


def training_rows(trained_items: np.ndarray | None, num_items: int) -> np.ndarray | None:
    """The rows of the item vectors a loss may score (padding first, then the trained items in
    index order), or None when every item is one (leave-one-out: nothing changes)."""
    if trained_items is None:
        return None
    trained = np.asarray(trained_items, dtype=bool).copy()
    if len(trained) != num_items + 1:
        raise ValueError(f"trained_items: {len(trained)} entries for {num_items} items")
    trained[0] = True  # padding: row 0, never a class
    return None if trained.all() else np.flatnonzero(trained)


def upgrade_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict with the network's weights under `network.`, whatever the
    version of the code that wrote it (see the module docstring)."""
    return {
        key if key.startswith(("network.", "loss.")) else f"network.{key}": value
        for key, value in state_dict.items()
    }


class SequentialRecommender(pl.LightningModule):
    def __init__(
        self,
        network: SequenceNetwork,
        loss: nn.Module | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable | None = None,
        scheduler_interval: str = "epoch",
        ks: Sequence[int] = DEFAULT_KS,
        weight_batches_by_targets: bool = True,
        data: DataInfo | None = None,
        static_step: bool = False,
    ):
        super().__init__()
        check_loss(type(network), loss)
        data = data or DataInfo(network.num_items)
        # The items training may know of: under a time split, not those first seen after the
        # validation cut. The loss then scores the training targets against these items only
        # (rows of the item vectors, targets renumbered): an item of the future is no class.
        rows = training_rows(data.trained_items, network.num_items)
        if loss is not None:
            check_catalogue(loss, network.num_items if rows is None else len(rows) - 1)
        self.network = network
        self.loss = loss
        self.num_items = network.num_items
        self.weight_batches_by_targets = weight_batches_by_targets
        # data.static_shapes: the loss weights every position of a padded batch by a mask instead of
        # gathering the target positions (`masked_loss`); `compile_step` then compiles the step whole.
        self.static_step = static_step
        if static_step and loss is not None and "mask" not in inspect.signature(loss.forward).parameters:
            raise UserInputError(
                f"data.static_shapes: the loss {type(loss).__name__} takes no mask= (docs/extending.md, "
                "a new loss); train it with data.static_shapes=false"
            )
        self._compiled_step: Callable | None = None
        # Target positions and batches trained on so far (this process, since the model was built
        # or loaded), for the running mean of targets per batch in training_step.
        self._targets_seen = 0
        self._batches_seen = 0
        # Factories (Hydra `_partial_: true`), kept out of the checkpoint so that checkpoints hold
        # only tensors and plain values and load with weights_only=True.
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-3)
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        # Not in the state dict: rebuilt from the data, as the loss is.
        index = None
        if rows is not None:
            index = torch.zeros(network.num_items + 1, dtype=torch.long)
            index[rows] = torch.arange(len(rows))
        self.register_buffer(
            "training_rows", None if rows is None else torch.from_numpy(rows), persistent=False
        )
        self.register_buffer("training_index", index, persistent=False)
        self.data_fingerprint = data.fingerprint
        # Original item ids and training counts, saved in the checkpoint, so that recommending in
        # original ids, popularity fallback included, needs no data (recsys/serving/recommend.py).
        self.catalogue = (
            None
            if data.item_ids is None
            else {"item_ids": data.item_ids, "train_item_counts": data.train_item_counts}
        )
        self.num_event_types = data.num_event_types
        features = data.item_features if getattr(network, "item_attributes", None) is not None else None
        self.attribute_vocabulary = None if features is None else [str(t) for t in features.vocabulary]
        self.ks = tuple(ks)
        check_ks(self.ks, network.num_items)
        self.eval_targets = "next"  # evaluation.targets, set by configure_evaluation
        self.val_metrics = RankingMetrics(self.ks)
        self.test_metrics = RankingMetrics(self.ks)
        # Set by configure_evaluation (train.py / evaluate.py); tests of the model need neither.
        self.list_metrics: ListMetrics | None = None
        self.sampled_evaluation: dict | None = None
        self.sampled_metrics = RankingMetrics(self.ks)
        self.ranking_chunk_size = DEFAULT_ITEM_CHUNK_SIZE
        # {"user", "rank"} of every user of the last test pass, from all processes, sorted by user;
        # under evaluation.targets=window "rank" is each user's best list position, "targets" their
        # target count and "ranks" the list positions of all targets, user after user.
        self.test_results: dict[str, torch.Tensor] = {}
        self._test_users: list[torch.Tensor] = []
        self._test_ranks: list[torch.Tensor] = []

    # --- training --------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if not self.network.trainable:
            return None  # e.g. most-popular: its counts came from the data, nothing to fit
        if self.static_step:
            loss, targets = (self._compiled_step or self.masked_loss)(batch)
            return self._weighted(loss, targets)
        hidden, targets, has_target = self.network.training_outputs(batch)
        index = flat_positions(has_target)
        queries = self.network.query_head(hidden.flatten(0, 1)[index])
        loss = self._loss(queries, targets.flatten()[index])
        return self._weighted(loss, len(index))

    def masked_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the target positions, their count) of a batch, from every position
        with a mask (data.static_shapes): no shape and no host sync depends on the data, so the
        step compiles to one graph per batch shape (`compile_step`). Same value and gradients as
        gathering the target positions first."""
        hidden, targets, has_target = self.network.training_outputs(batch)
        mask = has_target.flatten()
        queries = self.network.query_head(hidden.flatten(0, 1))
        return self._loss(queries, targets.flatten(), mask), mask.sum()

    def _loss(
        self, queries: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        items = self.network.item_vectors()
        if self.training_rows is not None:
            items, targets = items[self.training_rows], self.training_index[targets]
        if mask is None:
            return self.loss(queries, targets, items)
        return self.loss(queries, targets, items, mask=mask)

    def compile_step(self, mode: str | None = None, backend: str = "inductor") -> None:
        """torch.compile the masked training step (network and loss) with fullgraph=True and static
        shapes: one graph per batch shape, replayed as CUDA graphs with mode="reduce-overhead"."""
        if not self.static_step:
            raise UserInputError("compile: compiling the whole training step needs data.static_shapes=true")
        torch._dynamo.config.allow_rnn = True  # GRU4Rec: trace nn.GRU instead of refusing it
        self._compiled_step = torch.compile(
            self.masked_loss, fullgraph=True, dynamic=False, mode=mode, backend=backend
        )

    def _weighted(self, loss: torch.Tensor, targets: int | torch.Tensor) -> torch.Tensor:
        """Log a batch's mean loss over its `targets` target positions and return what to minimise.

        With weight_batches_by_targets, that is the mean times targets / (running mean of targets
        per batch): every target position then weighs the same in an epoch, however batches are
        formed. Why: length bucketing batches short histories together, so a batch may hold 256
        targets or 6,000; with plain batch means a short history's targets weighed ~20x a long
        one's. Dividing by the running mean, not a constant, keeps the average weight at 1, so
        learning rates tuned either way still fit."""
        # The static step keeps the loss off the progress bar, which reads it back (a host sync)
        # after every step; the loggers read it every trainer.log_every_n_steps.
        static = isinstance(targets, torch.Tensor)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=not static, batch_size=targets)
        if not self.weight_batches_by_targets:
            return loss
        world = self.trainer.world_size if self._trainer is not None else 1
        if static:
            # The static step: the same weights, the counts kept on the device (no host sync).
            count = targets.float()
            total = self.trainer.strategy.reduce(count.clone(), reduce_op="sum") if world > 1 else count
            self._targets_seen = total + self._targets_seen
            self._batches_seen += 1
            return loss * (world * count * self._batches_seen / self._targets_seen.clamp(min=1))
        if world > 1:
            # DDP averages the processes' gradients: weigh each by its share of the step's targets
            # over all processes, and keep the running mean of those totals, so that a target
            # weighs what it would in one process training on the combined batch.
            total = self.trainer.strategy.reduce(
                torch.tensor(float(targets), device=self.device), reduce_op="sum"
            )
            self._targets_seen += int(total.item())
            self._batches_seen += 1
            return loss * (world * targets * self._batches_seen / max(self._targets_seen, 1))
        self._targets_seen += targets
        self._batches_seen += 1
        return loss * (targets * self._batches_seen / max(self._targets_seen, 1))

    def setup(self, stage: str) -> None:
        skip_cudnn_attention()  # its per-shape planning stalls every new batch width (hardware.py)
        # DDP wraps the model to all-reduce gradients, and refuses a model with nothing to train.
        if stage == "fit" and self.trainer.world_size > 1 and not self.network.trainable:
            raise UserInputError(
                f"trainer.strategy: {type(self.network).__name__} has nothing to train in {self.trainer.world_size} "
                "processes; train it in one (trainer=default), then evaluate.py strategy=ddp runs in several"
            )

    def configure_optimizers(self):
        if not self.network.trainable:
            return None
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
            ids = np.asarray(self.catalogue["item_ids"])
            checkpoint["item_ids"] = (
                torch.from_numpy(ids.astype(np.int64)) if ids.dtype.kind in "iu" else [str(i) for i in ids]
            )
            checkpoint["train_item_counts"] = torch.as_tensor(self.catalogue["train_item_counts"])
        checkpoint["num_event_types"] = int(self.num_event_types)
        if self.attribute_vocabulary is not None:  # what each attribute embedding stands for
            checkpoint["item_attribute_vocabulary"] = self.attribute_vocabulary
        # So that a resumed run weighs its batches exactly as the uninterrupted run would have.
        checkpoint["targets_seen"] = int(self._targets_seen)
        checkpoint["batches_seen"] = self._batches_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning loads the state dict after this hook: older checkpoints resume too.
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
        self._targets_seen = int(checkpoint.get("targets_seen", 0))
        self._batches_seen = int(checkpoint.get("batches_seen", 0))

    # --- evaluation ------------------------------------------------------------------------------

    def configure_evaluation(
        self,
        item_counts: torch.Tensor | None = None,
        sampled: dict | None = None,
        item_chunk_size: int | None = None,
        targets: str = "next",
    ) -> None:
        """What the test pass measures besides the full-ranking metrics of the target.

        targets: evaluation.targets, next (one target per user) or window (several; validation too).
        item_counts: training counts of the items, for coverage, ARP and novelty of the top-K lists.
        sampled: {num_negatives, sampler: uniform|popularity, seed} to also rank the target among
        sampled unseen items, reported as test/sampled_<sampler>_<N>/<metric> (opt-in, see metrics.py).
        item_chunk_size: items scored at a time when ranking (memory: batch x this many scores).
        """
        if item_chunk_size is not None:
            if (
                isinstance(item_chunk_size, bool)
                or not isinstance(item_chunk_size, int)
                or item_chunk_size < 1
            ):
                raise UserInputError(
                    f"evaluation.item_chunk_size: must be an integer >= 1, got {item_chunk_size!r}"
                )
            self.ranking_chunk_size = item_chunk_size
        self.eval_targets = check_targets(targets)
        self.val_metrics = RankingMetrics(self.ks, targets)
        self.test_metrics = RankingMetrics(self.ks, targets)
        self.list_metrics = ListMetrics(self.ks, item_counts) if item_counts is not None else None
        if sampled and targets == "window":
            raise UserInputError(
                "evaluation.sampled: ranks one target among samples; not with evaluation.targets=window"
            )
        if not sampled:
            self.sampled_evaluation = None
            return
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

    @property
    def sampled_label(self) -> str | None:
        s = self.sampled_evaluation
        return None if s is None else f"sampled_{s['sampler']}_{s['num_negatives']}"

    def history_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's event types and time gaps, for a network that reads them."""
        if not self.network.reads_events:
            return {}
        return {
            "events": batch["history_events"],
            "gaps": batch["history_gaps"],
            "target_event": batch["target_event"],
        }

    def _rank(
        self, batch: dict[str, torch.Tensor], k: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
        """The targets' ranks (a target the batch marks as a `miss`, e.g. an item no training
        event has, ranked after every item), the top-k items (None when k is None) and a
        function giving the scores (B, n) of given items (B, n)."""
        if batch["target"].dim() == 2:
            return self._rank_window(batch, k)
        ranks, top, scores_of = self._rank_targets(batch, k)
        if "miss" in batch:
            ranks = torch.where(batch["miss"].to(ranks.device), self.num_items + 1, ranks)
        return ranks, top, scores_of

    def _rank_targets(
        self, batch: dict[str, torch.Tensor], k: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
        """The targets' ranks, the top-k items and the scores function, from one pass of the
        network over the histories."""
        target, exclude = batch["target"], batch["exclude"]
        network = self.network
        if network.scores_by_dot_product:
            queries = network.user_vectors(batch["history"], **self.history_features(batch)).float()
            items = network.item_vectors().float()
            ranks, top = chunked_ranking(queries, items, target, exclude, k, self.ranking_chunk_size)
            return ranks, top, lambda index: (queries[:, None, :] * items[index]).sum(dim=-1)
        scores = network.score(batch["history"], **self.history_features(batch)).float()
        top = None if k is None else top_k_items(scores, exclude, k)
        return target_ranks(scores, target, exclude), top, lambda index: scores.gather(1, index)

    def _rank_window(
        self, batch: dict[str, torch.Tensor], k: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """evaluation.targets=window: the (B, T) list positions of each user's targets (0 where a
        user has fewer; see recsys/evaluation/metrics.py) and the top-k items (None when k is None)."""
        targets, exclude = batch["target"], batch["exclude"]
        network = self.network
        if network.scores_by_dot_product:
            queries = network.user_vectors(batch["history"], **self.history_features(batch)).float()
            items = network.item_vectors().float()
            ranks, top = chunked_window_ranks(queries, items, targets, exclude, k, self.ranking_chunk_size)
        else:
            scores = network.score(batch["history"], **self.history_features(batch)).float()
            ranks = window_target_ranks(scores, targets, exclude)
            top = None if k is None else top_k_items(scores, exclude, k)
        return list_positions(ranks, batch["miss"].to(ranks.device), self.num_items), top, None

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
        if batch["target"].numel() == 0:  # a process's empty share (see recsys/data/batching.py)
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
        self._test_users, self._test_ranks, self._test_top = [], [], []

    def _batch_generator(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Generator:
        """The generator of a batch's sampled negatives, seeded by evaluation.sampled.seed and the
        batch's first user: the same negatives in every pass, whichever process ranks the batch."""
        seed = np.random.SeedSequence([self.sampled_evaluation["seed"], int(batch["user"][0])])
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed.generate_state(1)[0]))
        return generator

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch["target"].numel() == 0:  # a process's empty share (see recsys/data/batching.py)
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
        self._test_ranks.append(ranks.cpu())  # (B,) or, several targets per user, (B, T)
        if top is not None:  # the recommended lists, kept for per_user.parquet (interleaving)
            self._test_top.append(top.cpu())

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute(self._reduce_sum)
        if self.list_metrics is not None:
            results.update(self.list_metrics.compute(self._reduce_sum))
        if self.sampled_evaluation is not None:
            sampled = self.sampled_metrics.compute(self._reduce_sum)
            results.update({f"{self.sampled_label}/{name}": value for name, value in sampled.items()})
        self.log_dict({f"test/{name}": value for name, value in results.items()}, sync_dist=False)
        empty = torch.zeros(0, dtype=torch.long)
        local_users = torch.cat(self._test_users) if self._test_users else empty
        if self.eval_targets == "window":
            # Each user's target count and the positions of the targets, flattened user by user.
            counts = [(r > 0).sum(dim=1) for r in self._test_ranks]
            local_counts = torch.cat(counts) if counts else empty
            local_ranks = torch.cat([r[r > 0] for r in self._test_ranks]) if counts else empty
        else:
            local_counts = local_ranks = torch.cat(self._test_ranks) if self._test_ranks else empty
        users, counts, ranks = (self._gather_cat(v) for v in (local_users, local_counts, local_ranks))
        order = torch.argsort(users, stable=True)
        users = users[order]
        if len(users) > 1 and bool((users[1:] == users[:-1]).any()):
            raise RuntimeError("test: a user was evaluated more than once (duplicated across processes)")
        top = {}
        if self.list_metrics is not None:  # every rank ranked with the same k (possibly no batch)
            k = min(max(self.ks), self.num_items)
            local_top = torch.cat(self._test_top) if self._test_top else empty.reshape(0, k)
            top = {"top": self._gather_cat(local_top.reshape(-1)).reshape(-1, k)[order]}
        if self.eval_targets != "window":
            self.test_results = {"user": users, "rank": ranks[order], **top}
            return
        # Each user's run of positions, moved into user order with one index (no per-user loop).
        begins = torch.cumsum(counts, 0) - counts
        sorted_counts = counts[order]
        owner = torch.repeat_interleave(torch.arange(len(order)), sorted_counts)
        offset = torch.arange(len(owner)) - torch.repeat_interleave(
            torch.cumsum(sorted_counts, 0) - sorted_counts, sorted_counts
        )
        flat = ranks[begins[order][owner] + offset]
        best = torch.full((len(order),), torch.iinfo(torch.long).max, dtype=torch.long)
        self.test_results = {
            "user": users,
            "rank": best.scatter_reduce(0, owner, flat, reduce="amin"),
            "targets": sorted_counts,
            "ranks": flat,
            **top,
        }
