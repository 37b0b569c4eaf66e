"""The one LightningModule: trains any network with any loss, and evaluates it under the protocol.

`SequentialRecommender(network, loss, optimizer, scheduler, ...)` owns what every model shares:
the training step (the loss of the network's queries against its item vectors, each batch
weighted by its target count), the optimizer and scheduler, the checkpoint extras and evaluation.
The network (recsys/models/network.py) holds only the model. Validation and test rank every item
for every user, identically for all networks: `RankingEvaluation` (recsys/training/evaluation_steps.py),
which also says how several processes (`trainer=ddp`) give the numbers of one.

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
)
from recsys.losses import check_catalogue
from recsys.models.network import DataInfo, SequenceNetwork, flat_positions
from recsys.training.evaluation_steps import RankingEvaluation
from recsys.training.hardware import skip_cudnn_attention, with_fused

OptimizerFactory = Callable[..., torch.optim.Optimizer]

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


class SequentialRecommender(RankingEvaluation, pl.LightningModule):
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
        self._cuda_graphs = False  # compile_step(mode="reduce-overhead")
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
        self.init_evaluation(ks)

    # --- training --------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if not self.network.trainable:
            return None  # e.g. most-popular: its counts came from the data, nothing to fit
        if self.static_step:
            if self._cuda_graphs:
                # A new training step: the graphs' outputs of the last one may be overwritten now.
                torch.compiler.cudagraph_mark_step_begin()
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
        self._cuda_graphs = mode == "reduce-overhead"
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
