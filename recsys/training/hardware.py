"""What the hardware can do: bf16, torch.compile, fused optimizers; fall back with one warning line.

A config asks for speed-ups (trainer.precision=bf16-mixed, compile=true|reduce-overhead); this module checks that
the machine can deliver them and, where it cannot, changes the request to what works and says so
in one warning line naming the key and what was changed. A GPU asked for where there is none is an
error, not a silent CPU run.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import shutil
from collections.abc import Callable

import torch
from torch import nn

from recsys.errors import UserInputError

log = logging.getLogger(__name__)


def _fallback(message: str) -> None:
    log.warning(message)  # one line; Python prints it even where logging is not configured


def uses_cuda(accelerator: str) -> bool:
    """Whether a Lightning `accelerator` setting resolves to a CUDA GPU on this machine."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserInputError(
                f"trainer.accelerator: {accelerator!r} asks for a GPU, but torch sees no CUDA device "
                f"(torch {torch.__version__}); use trainer=cpu or trainer.accelerator=auto"
            )
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def check_precision(precision: str, accelerator: str) -> str:
    """`precision`, or 32-true where bf16 was asked for on a GPU without bf16 support.

    CPUs run bf16 autocast (emulated where they lack bf16 instructions), so it is left alone there.
    """
    precision = str(precision)
    if "bf16" in precision and uses_cuda(accelerator) and not torch.cuda.is_bf16_supported():
        _fallback(
            f"trainer.precision: {precision} needs bf16 support, which "
            f"{torch.cuda.get_device_name()} lacks; using 32-true"
        )
        return "32-true"
    return precision


def skip_cudnn_attention() -> None:
    """Leave cuDNN out of the kernels SDPA may choose (flash, memory-efficient and math remain).

    PyTorch prefers cuDNN's attention on Hopper GPUs, and cuDNN builds an execution plan for each
    new input shape: 70-100 ms of CPU time for the forward and as much for the backward on an H100
    (torch 2.11; the torch.profiler trace of benchmarks/train_throughput.py, see BENCHMARKS.md),
    while a call with a shape it has seen takes 0.1-0.2 ms. Training batches are trimmed to their
    longest sequence, so until every width has been seen nearly every batch is a new shape and the
    GPU waits. Flash and memory-efficient attention have no per-shape set-up. The switch is global
    (PyTorch has no other); it is harmless without a GPU.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run on `device_type` here, or None if it can."""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU"
        if torch.cuda.get_device_capability() < (7, 0):
            return f"{torch.cuda.get_device_name()} is older than compute capability 7.0"
        return None
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang", "c++", "g++")):
        return "no C/C++ compiler is on the PATH"
    return None


def check_compile(setting, static_shapes: bool) -> None:
    """The `compile` key: false, true (torch.compile) or reduce-overhead (and CUDA graphs, which
    replay a step only for shapes they have captured: data.static_shapes)."""
    if not (isinstance(setting, bool) or setting == "reduce-overhead"):
        raise UserInputError(f"compile: must be false, true or reduce-overhead, got {setting!r}")
    if setting == "reduce-overhead" and not static_shapes:
        raise UserInputError(
            "compile: reduce-overhead (CUDA graphs) needs training batches of fixed shapes; set data.static_shapes=true"
        )


def compile_training(model, setting, device_type: str, backend: str = "inductor") -> bool:
    """Compile what `setting` (the `compile` key) asks for, if it can run here: with
    data.static_shapes the whole training step of `model` (a SequentialRecommender: network and
    loss, fullgraph, one graph per batch shape; `compile_step`), otherwise the network's forward
    (`maybe_compile`). Returns whether anything was compiled."""
    check_compile(setting, model.static_step)
    if not model.static_step:
        return maybe_compile(model.network, bool(setting), device_type, backend)
    if setting is False:
        return False
    problem = compile_problem(device_type)
    if problem is not None:
        _fallback(f"compile: torch.compile cannot run here ({problem}); training eager instead")
        return False
    model.compile_step(mode=None if setting is True else setting, backend=backend)
    return True


def maybe_compile(model: nn.Module, enabled: bool, device_type: str, backend: str = "inductor") -> bool:
    """Compile `model`'s forward in place (state-dict keys unchanged) if asked and possible.

    Only the network is compiled; losses and ranking stay eager (their chunk loops would each
    recompile). Shapes vary from batch to batch (trimmed to the longest sequence), so dimensions
    are marked dynamic after the first recompilation, PyTorch's default. `backend` is torch.compile's
    (the tests use "aot_eager": the same graph capture without code generation).
    """
    if not enabled:
        return False
    problem = compile_problem(device_type)
    if problem is not None:
        _fallback(f"compile: torch.compile cannot run here ({problem}); training eager instead")
        return False
    model.compile(backend=backend)
    return True


def with_fused(factory: Callable, parameters_on_cuda: bool) -> Callable:
    """The optimizer factory with fused=True added where its optimizer has a fused CUDA kernel
    (AdamW, Adam, SGD...), the parameters are on a GPU, and the config did not set `fused` itself."""
    if not parameters_on_cuda or not isinstance(factory, functools.partial):
        return factory
    if "fused" in factory.keywords or "foreach" in factory.keywords:
        return factory
    try:
        accepts = "fused" in inspect.signature(factory.func).parameters
    except (TypeError, ValueError):
        return factory
    return functools.partial(factory, fused=True) if accepts else factory
