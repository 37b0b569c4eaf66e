"""The GPU path: fused attention kernels, bf16, chunked loss and ranking, compile, fused AdamW.

Skipped without a CUDA GPU; `benchmarks/gpu_check.sh` runs them on a lent GPU machine.
"""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from recsys.data import SequenceDataModule
from recsys.evaluation.metrics import chunked_ranking, target_ranks, top_k_items
from recsys.fused_cross_entropy import unavailable_reason as fused_unavailable_reason
from recsys.losses import FullCrossEntropy
from recsys.models.bert4rec import BERT4Rec
from recsys.models.hstu import HSTU
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from recsys.models.transformer import SelfAttention, reference_attention
from recsys.training import hardware
from recsys.training.module import SequentialRecommender

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def right_padded(lengths, num_items, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, num_items + 1, (length,), generator=generator)
    return ids.to(CUDA)


def relative_error(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_causal_sasrec_runs_on_the_flash_kernel_in_bf16():
    torch.manual_seed(0)
    model = SASRec(DataInfo(500), max_len=64, dim=64, num_heads=2, dropout=0.0).to(CUDA)
    ids = right_padded([64, 40, 3, 17], 500, 64)
    eager = model(ids)  # float32, any kernel
    # Restricted to flash: SDPA raises rather than falling back if SASRec passed a mask.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model(ids)
        hidden[ids != 0].sum().backward()
    real = ids != 0
    assert relative_error(hidden[real], eager[real]) < 2e-2
    assert model.item_embedding.weight.grad.isfinite().all()


def test_bidirectional_bert4rec_runs_on_the_memory_efficient_kernel():
    torch.manual_seed(0)
    model = BERT4Rec(DataInfo(500), max_len=63, dim=64, num_heads=2, dropout=0.0).to(CUDA)
    ids = right_padded([64, 40, 3, 17], 500, 64)
    eager = model(ids)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model(ids)
        hidden[ids != 0].sum().backward()
    real = ids != 0
    assert relative_error(hidden[real], eager[real]) < 2e-2
    assert not hidden.isnan().any()


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_matches_the_reference_on_gpu(causal):
    torch.manual_seed(1)
    attention = SelfAttention(dim=64, num_heads=2, dropout=0.0).to(CUDA).eval()
    x = torch.randn(8, 50, 64, device=CUDA)
    mask = None if causal else right_padded([50, 20, 1, 7, 50, 33, 2, 9], 5, 50) != 0
    q, k, v = attention.qkv(x).view(8, 50, 3, 2, 32).permute(2, 0, 3, 1, 4)
    want = attention.proj(reference_attention(q, k, v, causal, mask).transpose(1, 2).reshape(8, 50, 64))
    got = attention(x, causal, mask)
    rows = slice(None) if causal else mask
    assert relative_error(got[rows], want[rows]) < 1e-3  # TF32 matmuls


@pytest.mark.parametrize("item_chunk", [None, 1000, 4096])
def test_chunked_cross_entropy_on_gpu_equals_plain(item_chunk):
    torch.manual_seed(2)
    hidden = torch.randn(3000, 64, device=CUDA, requires_grad=True)
    table = (0.1 * torch.randn(20001, 64, device=CUDA)).requires_grad_()
    targets = torch.randint(1, 20001, (3000,), device=CUDA)
    reference = F.cross_entropy((hidden.double() @ table[1:].double().T), targets - 1)
    ref_grads = torch.autograd.grad(reference, (hidden, table))
    value = FullCrossEntropy(item_chunk_size=item_chunk)(hidden, targets, table)
    grads = torch.autograd.grad(value, (hidden, table))
    assert abs(value.item() - reference.item()) / reference.item() < 1e-3
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) < 1e-2


@pytest.mark.skipif(fused_unavailable_reason(CUDA) is not None, reason="needs Triton")
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_cross_entropy_on_gpu_equals_plain(bf16):
    torch.manual_seed(5)
    hidden = torch.randn(3001, 64, device=CUDA, requires_grad=True)  # ends mid-block
    table = (0.1 * torch.randn(20001, 64, device=CUDA)).requires_grad_()
    targets = torch.randint(1, 20001, (3001,), device=CUDA)
    targets[0] = 20000  # the last item, in the last (partial) block
    reference = F.cross_entropy((hidden.double() @ table[1:].double().T), targets - 1)
    ref_grads = torch.autograd.grad(reference, (hidden, table))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        value = FullCrossEntropy(fused=True)(hidden, targets, table)
    grads = torch.autograd.grad(value, (hidden, table))
    # TF32 or bf16 operands (about 3 significant digits), float32 accumulation and softmax.
    assert abs(value.item() - reference.item()) / reference.item() < 1e-3
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert relative_error(got, want) < 2e-2
    assert grads[1][0].abs().sum() == 0  # the padding row is never a class


def test_chunked_ranking_on_gpu_equals_full_ranking():
    torch.manual_seed(3)
    queries, items = torch.randn(256, 64, device=CUDA), torch.randn(100001, 64, device=CUDA)
    target = torch.randint(1, 100001, (256,), device=CUDA)
    exclude = torch.randint(0, 100001, (256, 50), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # ranking must ignore autocast
        ranks, top = chunked_ranking(queries, items, target, exclude, 20, chunk_size=30000)
    scores = queries @ items.T
    full = target_ranks(scores, target, exclude)
    # TF32 may order near-equal scores differently between the two products: allow a few ranks.
    assert (ranks - full).abs().max() <= 2
    assert (top == top_k_items(scores, exclude, 20)).float().mean() > 0.99


@pytest.mark.skipif(hardware.compile_problem("cuda") is not None, reason="torch.compile cannot run")
@pytest.mark.parametrize("model_class", [SASRec, BERT4Rec, HSTU])
def test_compiled_and_eager_agree_on_gpu(model_class):
    torch.manual_seed(4)
    model = model_class(DataInfo(300), max_len=20, dim=32, dropout=0.0).to(CUDA).eval()
    history = right_padded([20, 5, 1, 13], 300, 20)
    eager = model.user_vectors(history)
    assert hardware.maybe_compile(model, True, "cuda")
    compiled = model.user_vectors(history)
    assert relative_error(compiled, eager) < 1e-3


@pytest.mark.parametrize("fused_loss", [False, True])
def test_bf16_fit_on_gpu_with_fused_adamw_and_device_batches(fused_loss):
    datamodule = SequenceDataModule(
        name="synthetic",
        format="synthetic",
        synthetic={"num_users": 300, "num_items": 60, "seed": 0},
        max_len=20,
        batch_size=64,
        device_batches=True,
    )
    datamodule.setup()
    network = SASRec(DataInfo(datamodule.num_items), max_len=20, dim=32)
    model = SequentialRecommender(network, loss=FullCrossEntropy(fused=fused_loss))
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.optimizers[0].defaults.get("fused") is True
    assert trainer.callback_metrics["val/ndcg@10"] > 0.0


@pytest.mark.skipif(hardware.compile_problem("cuda") is not None, reason="torch.compile cannot run")
@pytest.mark.parametrize("fused_loss", [False, True])
def test_cuda_graph_step_equals_the_eager_static_step(fused_loss):
    # data.static_shapes with compile=reduce-overhead: the step replayed as CUDA graphs gives the
    # eager masked step's loss and gradients (float32, TF32 off, so that both run the same math).
    torch.backends.cuda.matmul.allow_tf32 = False
    batch = {"input_ids": right_padded([16, 9, 3, 1, 0, 0], 300, 16)}
    batch["target_ids"] = torch.roll(batch["input_ids"], -1, dims=1) * (batch["input_ids"] != 0)
    batch["input_ids"] = batch["input_ids"] * (batch["target_ids"] != 0)
    results = []
    for mode in (None, "reduce-overhead"):
        torch.manual_seed(0)
        network = SASRec(DataInfo(300), max_len=16, dim=32, dropout=0.0)
        model = SequentialRecommender(network, FullCrossEntropy(fused=fused_loss), static_step=True).to(CUDA)
        if mode is not None:
            model.compile_step(mode=mode)
        for _ in range(3):  # a CUDA graph is recorded on a later call than the first
            model.zero_grad()
            loss = model.training_step(batch, 0)  # the same batch: each step's weight is 1
            loss.backward()
        results.append((loss.detach().clone(), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (graphed, graphed_grads) = results
    assert relative_error(graphed, eager) < 1e-4
    for got, want in zip(graphed_grads, eager_grads):
        assert relative_error(got, want) < 1e-3
