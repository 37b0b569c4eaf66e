"""Building a model from a run's config: shared by train.py, evaluate.py and predict.py.

The `model` config node holds the network's `_target_` and constructor arguments plus the
training keys of `TRAINING_KEYS` (optimizer, scheduler, ...), which go to the one LightningModule
(`recsys.training.module.SequentialRecommender`). The loss is its own config group (`loss=`).
What the data says (item count, event types, training item counts, original ids, fingerprint)
reaches the network once, as a `DataInfo`; a loss gets the training item counts when its class
declares `uses_item_counts`. Options that cannot work are caught by `check_model_config` before
any data is read.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from recsys.errors import UserInputError
from recsys.models.network import DataInfo, SequenceNetwork
from recsys.training.module import SequentialRecommender, check_loss, training_rows

# Keys of the `model` node that configure training, not the network.
TRAINING_KEYS = ("optimizer", "scheduler", "scheduler_interval", "weight_batches_by_targets", "ks")
# Keys that run configs written before the network took a DataInfo may hold: the data gives them now.
DATA_KEYS = ("num_event_types", "item_counts")


def _instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        # A UserInputError raised by a constructor (a bad option value) is the message to show.
        if isinstance(err.__cause__, UserInputError):
            raise err.__cause__ from None
        raise UserInputError(f"{key}: {str(err).splitlines()[0]}") from None


def loss_class(loss_config: DictConfig | None) -> type | None:
    if loss_config is None:
        return None
    target = loss_config.get("_target_")
    try:
        return get_class(target)
    except Exception:
        raise UserInputError(f"loss._target_: cannot import {target!r}") from None


def build_loss(loss_config: DictConfig | None, item_counts: torch.Tensor | None = None) -> nn.Module | None:
    cls = loss_class(loss_config)
    if cls is None:
        return None
    if getattr(cls, "uses_item_counts", False):
        return _instantiate(loss_config, "loss", item_counts=item_counts)
    return _instantiate(loss_config, "loss")


def network_class(cfg: DictConfig) -> type[SequenceNetwork]:
    target = cfg.model.get("_target_")
    try:
        cls = get_class(target)
    except Exception:
        raise UserInputError(f"model._target_: cannot import {target!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, SequenceNetwork)):
        raise UserInputError(
            f"model._target_: {target!r} is not a SequenceNetwork (recsys/models/network.py)"
        )
    return cls


def network_config(model_config: DictConfig) -> DictConfig:
    """The network's part of the `model` node: everything but the training keys."""
    plain = OmegaConf.to_container(model_config, resolve=True)
    return OmegaConf.create({k: v for k, v in plain.items() if k not in TRAINING_KEYS + DATA_KEYS})


def check_model_config(cfg: DictConfig) -> None:
    """Raise UserInputError for model and loss options that cannot work; reads no data."""
    loss = build_loss(cfg.get("loss"))  # constructors check their own options
    network = network_class(cfg)
    check_loss(network, loss)
    network.check_options(network_config(cfg.model))
    # Event types and time gaps reach a network only from event-typed data (recsys/data/features.py).
    data = cfg.get("data") or {}
    for switch in ("event_embedding", "time_gaps"):
        if cfg.model.get(switch) and not data.get("event_types"):
            raise UserInputError(
                f"model.{switch}: the data has no event types; set data.event_types (e.g. data=retailrocket)"
            )
    # Timestamps reach a network only when the data module puts them in the batches.
    if cfg.model.get("time_bias") and not data.get("batch_times"):
        raise UserInputError(
            "model.time_bias: the batches carry no timestamps; leave data.batch_times to follow "
            "model.time_bias (data/common.yaml) or set it to true"
        )


def data_info(datamodule) -> DataInfo:
    """What the data module's data says about itself, for the network and the training module."""
    return DataInfo(
        num_items=datamodule.num_items,
        num_event_types=datamodule.num_event_types,
        train_item_counts=datamodule.train_item_counts(),
        item_ids=datamodule.data.item_ids,
        fingerprint=datamodule.fingerprint,
        item_features=datamodule.item_features,
        trained_items=datamodule.trained_item_mask(),
        recent_item_counts=datamodule.recent_item_counts if datamodule.protocol_name == "time" else None,
    )


def build_model(
    cfg: DictConfig, data: DataInfo, evaluation: DictConfig | dict | None = None
) -> SequentialRecommender:
    """The model of `cfg` for `data`, set up to evaluate as `evaluation` says (`cfg.evaluation`
    by default). The loss is built first, then the network, in the order that fixes the random
    initial weights for a seed."""
    network_class(cfg)  # a clear error for a _target_ that is not a network
    # A loss that reads item counts reads those of the items it scores (see training_rows).
    counts, rows = data.train_item_counts, training_rows(data.trained_items, data.num_items)
    loss = build_loss(cfg.get("loss"), counts if rows is None or counts is None else counts[rows])
    # Partial, then called: Hydra would turn a dataclass argument into a dict.
    network = _instantiate(network_config(cfg.model), "model", _partial_=True)(data)
    training = {key: cfg.model[key] for key in TRAINING_KEYS if key in cfg.model}
    options = {
        key: instantiate(value) if key in ("optimizer", "scheduler") else value
        for key, value in training.items()
    }
    if "ks" in options:
        options["ks"] = list(options["ks"])
    # data.static_shapes: batches of a few fixed shapes, trained by the masked step that compiles whole.
    static_step = bool(cfg.get("data", {}).get("static_shapes", False))
    model = SequentialRecommender(network, loss=loss, data=data, static_step=static_step, **options)
    evaluation = cfg.get("evaluation") if evaluation is None else evaluation
    evaluation = evaluation if evaluation is not None else {}
    sampled = evaluation.get("sampled")
    model.configure_evaluation(
        item_counts=data.train_item_counts,
        sampled=dict(sampled) if sampled else None,
        item_chunk_size=evaluation.get("item_chunk_size"),
        targets=evaluation.get("targets", "next"),
    )
    return model
