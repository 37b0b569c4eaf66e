"""The scoring model exported for serving without our code: TorchScript, ONNX and the item-id mapping.

`export_model(model, k, out_dir)` writes, into `out_dir`:

- `model.ts`: a TorchScript module (`torch.jit.load`), and/or
- `model.onnx`: an ONNX graph (opset 17; ONNX Runtime and other ONNX runtimes), and
- `item_ids.json` (when `item_ids` is given): a JSON array whose entry i is the original id of item
  index i; entry 0 stands for padding and is written as null (it is never recommended).

Both models compute the same function, `TopKScorer`:

    history (B, W) int64  ->  scores (B, k) float32, items (B, k) int64

`history` holds item indices (1..num_items), each row right-padded with 0 to the fixed width W
(`TopKScorer.width`, by default the model's max_len; the ONNX input declares it, named "history",
with a dynamic batch axis "batch"). Callers with a longer history keep its last W items (the most
recent), right-padded; a shorter one is padded with 0 at the end. The outputs ("scores", "items")
are the k best items of each row by dot product of the model's user and item vectors, best first,
with padding and every item present in the row excluded (seen items are not recommended). Map the
item indices back to original ids with `item_ids.json`. Should a row leave fewer than k candidates,
its last slots score -inf and their items mean nothing.

The item vectors are computed once, when the scorer is built, and held as a constant table: the
exported graph does not recompute them per request. The models are put in eval mode (no dropout).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from recsys.errors import UserInputError
from recsys.runs.files import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}
ITEM_IDS_FILE = "item_ids.json"
# Input width for models that look at no history (most-popular): any width works, this one is fixed.
DEFAULT_WIDTH = 50
ONNX_OPSET = 17
INPUT_NAMES = ["history"]
OUTPUT_NAMES = ["scores", "items"]


class TopKScorer(nn.Module):
    """A trained model's k best unseen items for right-padded histories, as one exportable module.

    forward(history (B, width) int64) -> (scores (B, k) float32, items (B, k) int64), best first;
    padding (index 0) and the items in each row score -inf before the top-k. `width` defaults to the
    model's max_len: callers right-pad shorter histories with 0 and keep the last `width` items of
    longer ones. A larger width than max_len is allowed: the model still sees the last max_len items,
    and all `width` are excluded from the recommendations.

    The model must score by dot product (`user_vectors` / `item_vectors`); it is put in eval mode
    and its item vectors (or the given `item_table`, which may add items ranked from their
    attributes) are copied into the buffer `item_table` (candidates + 1, d) here, so that a traced
    graph holds them as a constant.
    """

    def __init__(
        self, model: nn.Module, k: int, width: int | None = None, item_table: torch.Tensor | None = None
    ):
        super().__init__()
        name = type(model).__name__
        if not getattr(model, "scores_by_dot_product", False):
            raise UserInputError(
                f"export: {name} does not score items by dot product of user and item vectors; "
                "only such models can be exported"
            )
        if getattr(model, "reads_events", False) or getattr(model, "reads_times", False):
            raise UserInputError(
                f"export: this {name} reads event types, time gaps or timestamps "
                "(model.event_embedding / model.time_gaps / model.time_bias); "
                "the exported graph takes item histories only"
            )
        num_items = int(model.num_items)
        if item_table is None:
            with torch.no_grad():
                item_table = model.item_vectors()
        # Besides the trained items, the table may hold items added from their attributes
        # (recsys/serving/new_items.py): they are ranked like the others.
        candidates = item_table.shape[0] - 1
        if not 1 <= k <= candidates:
            raise UserInputError(f"export: k must lie in 1..{candidates} (the catalogue), got {k}")
        if width is None:
            width = int(getattr(model, "max_len", None) or DEFAULT_WIDTH)
        if width < 1:
            raise UserInputError(f"export: the input width must be at least 1, got {width}")
        model.eval()
        self.model = model
        self.k = int(k)
        self.width = int(width)
        self.num_items = num_items  # what histories may hold; the table may rank more
        table = item_table.detach().float().clone()
        if table.shape[0] < num_items + 1:
            raise UserInputError(
                f"export: {name}.item_vectors() has {table.shape[0]} rows, expected at least num_items + 1 = {num_items + 1}"
            )
        self.register_buffer("item_table", table)

    def example_input(self, batch: int = 4, seed: int = 0) -> torch.Tensor:
        """A right-padded batch (batch, width) with rows of different lengths: 1, the full width and
        others in between (what tracing runs the model on; any values would do, the graph has no
        branch on them)."""
        generator = torch.Generator().manual_seed(seed)
        items = torch.randint(1, self.num_items + 1, (batch, self.width), generator=generator)
        lengths = torch.linspace(1, self.width, batch).round().long()
        positions = torch.arange(self.width)
        return (items * (positions[None, :] < lengths[:, None])).to(self.item_table.device)

    def forward(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.model.user_vectors(history).float() @ self.item_table.T
        # Padding (index 0, also at each padded position of the row) and the items in the row.
        # A leading 0 column excludes padding even from rows with no padding.
        seen = torch.cat([torch.zeros_like(history[:, :1]), history], dim=1)
        scores = scores.scatter(1, seen, float("-inf"))
        top = scores.topk(self.k, dim=1)
        return top.values, top.indices


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """No gradients, and a LightningModule without a Trainer that tracing can inspect: the tracer
    reads every attribute, and `trainer` raises unless this flag is set (Lightning sets it the same
    way in its own `to_torchscript`)."""
    before = pl.LightningModule._jit_is_scripting
    pl.LightningModule._jit_is_scripting = True
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The shape checks the tracer warns about (keep_last_positions' width test, unpacking q, k, v)
            # depend on the fixed input width only, not on the values.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # torch.jit and the TorchScript-based ONNX exporter are deprecated in favour of torch.export.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            # Advanced indexing exports as Gather/ScatterND; the GRU with a dynamic batch runs fine
            # (both held to the eager scorer on other batch sizes by tests/test_export.py).
            warnings.filterwarnings("ignore", message="Exporting aten::index operator.*")
            warnings.filterwarnings(
                "ignore", message="Exporting a model to ONNX with a batch_size other than 1.*"
            )
            yield
    finally:
        pl.LightningModule._jit_is_scripting = before


# --- writing files ----------------------------------------------------------------------------------


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserInputError(f"export: {path} exists; pass overwrite=True to replace it")


def _write_atomically(path: Path, write: Callable[[str], None], overwrite: bool) -> Path:
    """write(temporary_path) a file in path's directory, then rename it to path (atomic_path)."""
    path = Path(path)
    _check_writable(path, overwrite)
    with atomic_path(path) as tmp:
        write(str(tmp))
    return path


def _same_top_k(expected: tuple[torch.Tensor, torch.Tensor], got: Sequence[Any], where: str) -> None:
    scores, items = (torch.as_tensor(value).cpu() for value in got)
    want_scores, want_items = (value.cpu() for value in expected)
    if not (torch.equal(items, want_items) and torch.allclose(scores, want_scores, atol=1e-4, rtol=1e-4)):
        raise RuntimeError(f"export: {where} does not reproduce the model's top-k on the example batch")


def export_torchscript(
    scorer: TopKScorer, path: str | os.PathLike, overwrite: bool = False, example: torch.Tensor | None = None
) -> Path:
    """Trace `scorer` on an example batch, save it as TorchScript at `path` (atomically), reload
    the file and check that it gives the same top-k as the scorer. Returns the path."""
    _check_writable(Path(path), overwrite)
    scorer.eval()
    example = scorer.example_input() if example is None else example
    with torch.no_grad():
        expected = scorer(example)
    with _tracing():
        traced = torch.jit.trace(scorer, (example,), check_trace=False)
        # The traced module shares the model's parameters: a copy of it, with gradients off so
        # that the served outputs carry no autograd graph, is what gets saved.
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        traced = torch.jit.load(buffer)
        for parameter in traced.parameters():
            parameter.requires_grad_(False)

    def write(temporary: str) -> None:
        with _tracing():
            torch.jit.save(traced, temporary)
            reloaded = torch.jit.load(temporary)
            _same_top_k(expected, reloaded(example), f"the TorchScript module {path}")

    return _write_atomically(Path(path), write, overwrite)


def export_onnx(
    scorer: TopKScorer, path: str | os.PathLike, overwrite: bool = False, example: torch.Tensor | None = None
) -> Path:
    """Export `scorer` as ONNX (opset 17, dynamic batch axis, fixed width) at `path` (atomically),
    with the TorchScript-based exporter (`dynamo=False`: no onnxscript needed). Needs the onnx
    package (the `serve` extra) for one rewrite of the graph ONNX Runtime needs (`_cast_boolean_eye`).
    When onnxruntime is installed the file is run on the example batch and must give the scorer's
    top-k. Returns the path."""
    _require_onnx()
    _check_writable(Path(path), overwrite)
    scorer.eval()
    example = scorer.example_input() if example is None else example
    with torch.no_grad():
        expected = scorer(example)

    def write(temporary: str) -> None:
        with _tracing():
            torch.onnx.export(
                scorer,
                (example,),
                temporary,
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                dynamic_axes={name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES},
            )
        _cast_boolean_eye(temporary)
        try:
            import onnxruntime
        except ImportError:
            log.warning("onnxruntime is not installed: %s was not checked by running it", path)
            return
        session = onnxruntime.InferenceSession(temporary, providers=["CPUExecutionProvider"])
        _same_top_k(
            expected, session.run(OUTPUT_NAMES, {"history": example.cpu().numpy()}), f"the ONNX model {path}"
        )

    return _write_atomically(Path(path), write, overwrite)


def _require_onnx():
    try:
        import onnx
    except ImportError as error:
        raise UserInputError(
            "export: ONNX export needs the onnx package: pip install 'recsys[serve]' (or onnx onnxruntime)"
        ) from error
    return onnx


def _cast_boolean_eye(path: str) -> None:
    """Rewrite each boolean EyeLike (`torch.eye(n, dtype=torch.bool)`, the attention's "every query
    sees itself" mask) as an int64 EyeLike and a Cast to bool: ONNX Runtime implements EyeLike for
    numbers only. Rewrites the file in place; a graph without one is left untouched."""
    onnx = _require_onnx()
    from onnx import TensorProto, helper

    model = onnx.load(path)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        info.name: info.type.tensor_type.elem_type
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    nodes, changed = [], False
    for node in model.graph.node:
        dtype = next((a.i for a in node.attribute if a.name == "dtype"), None)
        if (
            node.op_type != "EyeLike"
            or (dtype if dtype is not None else types.get(node.input[0])) != TensorProto.BOOL
        ):
            nodes.append(node)
            continue
        changed = True
        numeric_in, numeric_out = f"{node.name}/int64_input", f"{node.name}/int64_output"
        nodes.append(
            helper.make_node(
                "Cast", [node.input[0]], [numeric_in], f"{node.name}/CastIn", to=TensorProto.INT64
            )
        )
        nodes.append(
            helper.make_node("EyeLike", [numeric_in], [numeric_out], node.name, dtype=TensorProto.INT64)
        )
        nodes.append(
            helper.make_node(
                "Cast", [numeric_out], [node.output[0]], f"{node.name}/CastOut", to=TensorProto.BOOL
            )
        )
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.checker.check_model(model)
        onnx.save(model, path)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def write_item_mapping(item_ids: Iterable[Any], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the item index -> original id mapping as a JSON array (atomically): entry i is the
    original id of item index i, entry 0 (padding, never recommended) is null. Returns the path."""
    ids = [_plain(value) for value in item_ids]
    if not ids:
        raise UserInputError("export: the item-id mapping is empty; entry 0 stands for padding")
    ids[0] = None
    try:
        text = json.dumps(ids, ensure_ascii=False)
    except TypeError as error:
        raise UserInputError(f"export: item ids must be strings or numbers: {error}") from None

    def write(temporary: str) -> None:
        Path(temporary).write_text(text + "\n", encoding="utf-8")

    return _write_atomically(Path(path), write, overwrite)


EXPORTERS = {"torchscript": export_torchscript, "onnx": export_onnx}


def check_formats(formats: Iterable[str]) -> list[str]:
    """The formats asked for, in order and without repeats; UserInputError for an unknown one."""
    chosen: list[str] = []
    for name in [formats] if isinstance(formats, str) else formats:
        if name not in FORMATS:
            raise UserInputError(f"export: {name!r} is not one of {list(FORMATS)}")
        if name not in chosen:
            chosen.append(str(name))
    if not chosen:
        raise UserInputError(f"export: no format given; choose from {list(FORMATS)}")
    return chosen


def export_model(
    model: nn.Module,
    k: int,
    out_dir: str | os.PathLike,
    formats: Iterable[str] = FORMATS,
    item_ids: Sequence[Any] | None = None,
    overwrite: bool = False,
    width: int | None = None,
    item_table: torch.Tensor | None = None,
) -> dict[str, Path]:
    """Export `model`'s top-k scorer to `out_dir` as model.ts / model.onnx (see the module docstring),
    with item_ids.json beside them when `item_ids` (num_items + 1 original ids, entry 0 padding) is
    given. Nothing is written unless every file can be: existing files are refused first unless
    `overwrite`. Returns {format: path}, plus {"item_ids": path} when the mapping was written."""
    chosen = check_formats(formats)
    out_dir = Path(out_dir)
    paths = {name: out_dir / FILE_NAMES[name] for name in chosen}
    rows = model.num_items + 1 if item_table is None else item_table.shape[0]
    if item_ids is not None:
        if len(item_ids) != rows:
            raise UserInputError(
                f"export: {len(item_ids)} item ids for a model of {rows - 1} items; "
                f"expected {rows} (entry 0 for padding)"
            )
        paths["item_ids"] = out_dir / ITEM_IDS_FILE
    for path in paths.values():
        _check_writable(path, overwrite)
    scorer = TopKScorer(model, k, width, item_table)
    written = {}
    for name in chosen:
        written[name] = EXPORTERS[name](scorer, paths[name], overwrite=overwrite)
    if item_ids is not None:
        written["item_ids"] = write_item_mapping(item_ids, paths["item_ids"], overwrite=overwrite)
    return written
