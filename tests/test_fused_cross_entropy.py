"""The Triton cross-entropy kernels held to F.cross_entropy.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported, hence a subprocess), with small tiles so that every shape below spans several blocks
and ranges and ends mid-block. tests/models/test_gpu.py runs them compiled on a GPU.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys.errors import UserInputError
from recsys.losses import FullCrossEntropy

ROOT = Path(__file__).resolve().parents[1]

# (tokens, items, dim, block_tokens, block_items): one token; fewer items than a block; dims that
# are not a power of two; more blocks than the interpreter's programs (so ranges hold several).
SHAPES = [(1, 5, 16, 16, 16), (37, 53, 24, 16, 16), (200, 1000, 64, 32, 64), (130, 300, 8, 16, 32)]

CHECK = """
import json, sys
import torch, torch.nn.functional as F
from recsys.fused_cross_entropy import fused_cross_entropy
report = []
for tokens, items, dim, block_tokens, block_items in json.loads(sys.argv[1]):
    torch.manual_seed(tokens + items)
    hidden = torch.randn(tokens, dim, requires_grad=True)
    weight = (0.5 * torch.randn(items, dim)).requires_grad_()
    targets = torch.randint(0, items, (tokens,))
    targets[0] = items - 1  # the last item, in the last (partial) block
    value = fused_cross_entropy(hidden, weight, targets, block_tokens, block_items)
    grads = torch.autograd.grad(3.0 * value, (hidden, weight))  # an upstream gradient other than 1
    reference = F.cross_entropy(hidden.double() @ weight.double().T, targets)
    want = torch.autograd.grad(3.0 * reference, (hidden, weight))
    report.append({
        "value": abs(value.item() - reference.item()) / reference.item(),
        "grads": [float((g.double() - w).norm() / w.norm()) for g, w in zip(grads, want)],
    })
# A frozen item table: only d hidden is computed (the d weight kernel does not run).
hidden = torch.randn(40, 24, requires_grad=True)
weight = 0.5 * torch.randn(70, 24)
targets = torch.randint(0, 70, (40,))
(grad,) = torch.autograd.grad(fused_cross_entropy(hidden, weight, targets, 16, 16), (hidden,))
(want,) = torch.autograd.grad(F.cross_entropy(hidden.double() @ weight.double().T, targets), (hidden,))
report.append({"value": 0.0, "grads": [float((grad.double() - want).norm() / want.norm())]})
print(json.dumps(report))
"""


def _triton_interpreter_problem() -> str | None:
    try:
        import triton
    except ImportError:
        return "triton is not installed (the Makefile's set-up installs it)"
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 8):
        # Older interpreters turn 1-element arrays into ints, which numpy >= 2.4 refuses.
        return f"the interpreter of triton {triton.__version__} fails with this numpy; needs >= 3.8"
    return None


@pytest.mark.skipif(_triton_interpreter_problem() is not None, reason=str(_triton_interpreter_problem()))
def test_fused_kernels_equal_plain_cross_entropy_in_the_interpreter():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", CHECK, json.dumps(SHAPES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == len(SHAPES) + 1
    for shape, errors in zip(SHAPES + ["frozen item table"], report):
        assert errors["value"] < 1e-5, shape
        assert max(errors["grads"]) < 1e-5, (shape, errors["grads"])


def test_fused_true_without_a_gpu_warns_once_and_uses_the_torch_loss(caplog):
    torch.manual_seed(0)
    hidden, table, targets = torch.randn(9, 8), torch.randn(21, 8), torch.randint(1, 21, (9,))
    loss = FullCrossEntropy(fused=True)
    with caplog.at_level(logging.WARNING, logger="recsys.losses"):
        first, second = loss(hidden, targets, table), loss(hidden, targets, table)
    assert first.item() == pytest.approx(FullCrossEntropy()(hidden, targets, table).item())
    assert second.item() == first.item()
    warnings = [r.getMessage() for r in caplog.records if "loss.fused" in r.getMessage()]
    assert len(warnings) == 1 and "PyTorch loss instead" in warnings[0]


def test_fused_auto_without_a_gpu_is_silent(caplog):
    hidden, table, targets = torch.randn(4, 8), torch.randn(11, 8), torch.randint(1, 11, (4,))
    with caplog.at_level(logging.WARNING, logger="recsys.losses"):
        FullCrossEntropy(fused="auto")(hidden, targets, table)
    assert not [r for r in caplog.records if "loss.fused" in r.getMessage()]


def test_fused_must_be_true_false_or_auto():
    with pytest.raises(UserInputError, match="loss.fused: must be true, false or auto, got 'yes'"):
        FullCrossEntropy(fused="yes")


# Random shapes for the kernels: tokens, items and dims drawn from a seeded generator, tiles of 16
# or 32, so that shapes end mid-tile and the ranges of items and tokens split unevenly. The
# reference is the softmax written out in float64 (no F.cross_entropy).
RANDOM_CHECK = """
import json, sys
import torch
from recsys.fused_cross_entropy import fused_cross_entropy
report = []
generator = torch.Generator().manual_seed(int(sys.argv[1]))
def draw(low, high):
    return int(torch.randint(low, high + 1, (), generator=generator))
for case in range(int(sys.argv[2])):
    tokens, items, dim = draw(1, 70), draw(1, 150), draw(1, 40)
    block_tokens, block_items = 16 * draw(1, 2), 16 * draw(1, 2)
    hidden = torch.randn(tokens, dim, generator=generator).requires_grad_()
    weight = (0.5 * torch.randn(items, dim, generator=generator)).requires_grad_()
    targets = torch.randint(0, items, (tokens,), generator=generator)
    targets[0], targets[-1] = items - 1, 0
    value = fused_cross_entropy(hidden, weight, targets, block_tokens, block_items)
    grads = torch.autograd.grad(1.7 * value, (hidden, weight))
    logits = hidden.double() @ weight.double().T
    peak = logits.max(dim=1, keepdim=True).values
    logsumexp = peak[:, 0] + (logits - peak).exp().sum(dim=1).log()
    reference = (logsumexp - logits[torch.arange(tokens), targets]).mean()
    want = torch.autograd.grad(1.7 * reference, (hidden, weight))
    report.append({
        "shape": [tokens, items, dim, block_tokens, block_items],
        "value": abs(value.item() - reference.item()) / max(abs(reference.item()), 1e-6),
        "grads": [float((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(grads, want)],
    })
print(json.dumps(report))
"""


def run_interpreted(script, *args):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_triton_interpreter_problem() is not None, reason=str(_triton_interpreter_problem()))
def test_fused_kernels_equal_a_plain_softmax_over_random_shapes():
    report = run_interpreted(RANDOM_CHECK, "0", "20")
    assert len(report) == 20
    for case in report:
        assert case["value"] < 1e-5, case
        assert max(case["grads"]) < 1e-5, case
