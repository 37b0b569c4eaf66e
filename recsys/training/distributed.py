"""Trainer options for one or several processes: one-line errors when they cannot be met.

Lightning does the multi-process work (launching the processes, the process group, all-reduce and
all-gather); the data module deals each process its own batches (recsys/data/batching.py) and
the model reduces the metrics exactly (recsys/training/module.py). What is left here is turning a
trainer that cannot be built as asked (a strategy name that does not exist, GPUs that are not
there) into a `UserInputError` that names the key, before or while Lightning builds the Trainer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.strategies import StrategyRegistry

from recsys.errors import UserInputError

# What Lightning raises for trainer options it cannot meet.
_OPTION_ERRORS = (MisconfigurationException, ValueError, TypeError, ImportError)


def strategy_names() -> list[str]:
    """The main strategy names Lightning accepts (without variants such as deepspeed_stage_2)."""
    variants = ("find_unused", "stage_", "offload", "debug")
    return ["auto"] + [
        n for n in StrategyRegistry.available_strategies() if not any(v in n for v in variants)
    ]


def _gpu_indices(devices: Any) -> list[int] | None:
    """The GPU indices that `devices` asks for, or None when it asks for 'all there are'."""
    if devices in (None, "auto", -1, "-1"):
        return None
    if isinstance(devices, str):
        devices = [int(d) for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if isinstance(devices, int):
        return list(range(devices))
    return [int(d) for d in devices]


def check_trainer_options(options: Mapping[str, Any], prefix: str = "trainer.") -> None:
    """Refuse, naming the key (`prefix` + name), a strategy that does not exist, GPUs that are not
    there, and several processes with Lightning's DistributedSampler (which pads the evaluated users
    with duplicates; the data module deals each process its share instead). CPU devices are
    processes, so any positive number of them is there."""
    strategy = options.get("strategy", "auto")
    known = ["auto", *StrategyRegistry.available_strategies()]
    if isinstance(strategy, str) and strategy.lower() not in known:
        raise UserInputError(
            f"{prefix}strategy: {strategy!r} is not a Lightning strategy; use one of {', '.join(strategy_names())}"
        )
    accelerator = str(options.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    available = torch.cuda.device_count() if on_gpu else 0
    if on_gpu and available == 0:
        raise UserInputError(
            f"{prefix}accelerator: {accelerator!r} asks for a GPU, but torch sees no CUDA device "
            f"(torch {torch.__version__}); use accelerator=cpu or auto"
        )
    try:
        asked = _gpu_indices(options.get("devices", "auto"))
        processes = (len(asked) if asked is not None else max(1, available)) * int(
            options.get("num_nodes", 1)
        )
    except (TypeError, ValueError):
        return  # not a count or a list: Lightning's own message names it when it builds the Trainer
    if on_gpu and asked is not None and any(not 0 <= index < available for index in asked):
        raise UserInputError(
            f"{prefix}devices: {options.get('devices')!r} asks for GPUs {asked}, but this machine has "
            f"{available} ({list(range(available))})"
        )
    if processes > 1 and options.get("use_distributed_sampler", True):
        raise UserInputError(
            f"{prefix}use_distributed_sampler: must be false with {processes} processes (the data module "
            "deals each process its own users; Lightning's sampler would repeat some); use trainer=ddp"
        )


def _key_of(message: str) -> str:
    """The trainer option a Lightning error message is about ('' when it names none)."""
    lowered = message.lower()
    for key, words in (
        ("strategy", ("strategy",)),
        ("num_nodes", ("num_nodes",)),
        ("devices", ("devices", "requested gpu", "gpu backend", "machine only has")),
        ("accelerator", ("accelerator",)),
        ("precision", ("precision",)),
    ):
        if any(word in lowered for word in words):
            return key
    return ""


@contextmanager
def trainer_errors(options: Mapping[str, Any], prefix: str = "trainer.") -> Iterator[None]:
    """Check `options` (the trainer's config), then build the Trainer in the block: Lightning's
    errors about its options become one-line UserInputErrors naming the key.

        with trainer_errors(cfg.trainer):
            trainer = instantiate(cfg.trainer, ...)
    """
    check_trainer_options(options, prefix)
    try:
        yield
    except UserInputError:
        raise
    except (InstantiationException, *_OPTION_ERRORS) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if not isinstance(cause, _OPTION_ERRORS):
            raise
        text = " ".join(str(cause).split()) or type(cause).__name__
        key = _key_of(text)
        raise UserInputError(
            f"{prefix}{key}: {text}" if key else f"{prefix.rstrip('.') or 'trainer'}: {text}"
        ) from None
