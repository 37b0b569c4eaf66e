import functools
import logging

import pytest
import pytorch_lightning as pl
import torch

from recsys.errors import UserInputError
from recsys.models.bert4rec import BERT4Rec
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from recsys.training import hardware
from tests.builders import module


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_asked_for_without_one_is_a_one_line_error():
    with pytest.raises(
        UserInputError, match="trainer.accelerator: 'gpu' asks for a GPU, but torch sees no CUDA"
    ):
        hardware.uses_cuda("gpu")
    assert not hardware.uses_cuda("auto") and not hardware.uses_cuda("cpu")
    assert hardware.check_precision("bf16-mixed", "cpu") == "bf16-mixed"  # CPUs run bf16 autocast


def test_bf16_on_a_gpu_without_it_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with caplog.at_level(logging.WARNING, logger="recsys.training.hardware"):
        assert hardware.check_precision("bf16-mixed", "gpu") == "32-true"
    assert [r.getMessage() for r in caplog.records] == [
        "trainer.precision: bf16-mixed needs bf16 support, which Tesla V100 lacks; using 32-true"
    ]


def test_compile_without_a_compiler_falls_back_to_eager(monkeypatch, caplog):
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    model = SASRec(DataInfo(30), max_len=4, dim=8)
    with caplog.at_level(logging.WARNING, logger="recsys.training.hardware"):
        assert not hardware.maybe_compile(model, True, "cpu")
    assert len(caplog.records) == 1 and "compile: torch.compile cannot run here" in caplog.text
    assert not hardware.maybe_compile(model, False, "cpu")


def test_fused_adamw_only_on_a_gpu_and_only_if_unset():
    factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert hardware.with_fused(factory, parameters_on_cuda=False) is factory
    assert hardware.with_fused(factory, parameters_on_cuda=True).keywords == {"lr": 1e-3, "fused": True}
    mine = functools.partial(torch.optim.AdamW, lr=1e-3, fused=False)
    assert hardware.with_fused(mine, parameters_on_cuda=True) is mine
    assert hardware.with_fused(lambda p: None, parameters_on_cuda=True)  # not a partial: unchanged


@pytest.mark.skipif(hardware.compile_problem("cpu") is not None, reason="torch.compile cannot run here")
def test_compiled_and_eager_models_agree():
    # Dynamo's graph capture with the aot_eager backend: the same graphs, no C++ code generation,
    # which takes most of a minute per model on 2 CPU cores. The GPU tests (tests/models/test_gpu.py)
    # compile SASRec and BERT4Rec with the real (inductor) backend.
    torch.manual_seed(0)
    for model in (
        SASRec(DataInfo(30), max_len=6, dim=16, dropout=0.0),
        BERT4Rec(DataInfo(30), max_len=6, dim=16, dropout=0.0),
    ):
        model.eval()
        history = torch.tensor([[3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
        eager = model.user_vectors(history)
        assert hardware.maybe_compile(model, True, "cpu", backend="aot_eager")
        compiled = model.user_vectors(history)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_models_leave_cudnn_out_of_attention_when_lightning_sets_them_up():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        model = module(SASRec(DataInfo(30), max_len=6, dim=16))
        model.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        model.setup("fit")  # what Lightning calls before fit, validate, test and predict
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
