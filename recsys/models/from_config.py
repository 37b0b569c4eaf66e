"""Building a model and its loss from a run's config: shared by train.py and evaluate.py.

The loss is its own config group (`loss=`), instantiated here and handed to the model. Options a
model or loss cannot work with are caught by `check_model_config` before any data is read. Data-
derived inputs are passed explicitly: a config with an `item_counts` key (the most-popular model,
losses that sample by popularity or correct for it) receives the training set's item counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from recsys.errors import UserInputError


def _instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        # A UserInputError raised by a constructor (a bad option value) is the message to show.
        if isinstance(err.__cause__, UserInputError):
            raise err.__cause__ from None
        raise UserInputError(f"{key}: {str(err).splitlines()[0]}") from None


def build_loss(loss_config: DictConfig | None, item_counts=None) -> nn.Module | None:
    if loss_config is None:
        return None
    if "item_counts" in loss_config:
        return _instantiate(loss_config, "loss", item_counts=item_counts)
    return _instantiate(loss_config, "loss")


def model_class(cfg: DictConfig) -> type:
    target = cfg.model.get("_target_")
    try:
        return get_class(target)
    except Exception:
        raise UserInputError(f"model._target_: cannot import {target!r}") from None


def check_model_config(cfg: DictConfig) -> None:
    """Raise UserInputError for model and loss options that cannot work; reads no data."""
    loss = build_loss(cfg.get("loss"))  # constructors check their own options
    model_class(cfg).check_options(cfg.model, loss)


def build_model(
    cfg: DictConfig,
    datamodule=None,
    num_items: int | None = None,
    data_fingerprint: str | None = None,
    evaluation: DictConfig | None = None,
    item_counts: torch.Tensor | None = None,
    item_ids: np.ndarray | None = None,
    num_event_types: int | None = None,
):
    """The model of `cfg` for the data of `datamodule` (its item count, fingerprint, training item
    counts, original item ids and number of event types by default; without a datamodule all must
    be given), set up to evaluate as `evaluation` says (`cfg.evaluation` by default)."""
    counts = datamodule.train_item_counts() if item_counts is None else item_counts
    kwargs: dict[str, Any] = {
        "num_items": datamodule.num_items if num_items is None else num_items,
        "data_fingerprint": datamodule.fingerprint if data_fingerprint is None else data_fingerprint,
    }
    if "item_counts" in cfg.model:
        kwargs["item_counts"] = counts
    if "num_event_types" in cfg.model:  # models that can read event types (browse vs buy)
        kwargs["num_event_types"] = datamodule.num_event_types if num_event_types is None else num_event_types
    if model_class(cfg).uses_loss:
        kwargs["loss"] = build_loss(cfg.get("loss"), counts)
    model = _instantiate(cfg.model, "model", **kwargs)
    # Saved in the checkpoint, so that recommending in original ids needs no data (recsys/recommend.py).
    model.catalogue = {
        "item_ids": datamodule.data.item_ids if item_ids is None else item_ids,
        "train_item_counts": counts,
    }
    evaluation = cfg.get("evaluation") if evaluation is None else evaluation
    evaluation = evaluation if evaluation is not None else {}
    sampled = evaluation.get("sampled")
    model.configure_evaluation(
        item_counts=counts,
        sampled=dict(sampled) if sampled else None,
        item_chunk_size=evaluation.get("item_chunk_size"),
    )
    return model
