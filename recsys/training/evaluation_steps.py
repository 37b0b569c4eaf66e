"""Validation and test of the one training module: every item ranked for every user.

`RankingEvaluation` is the evaluation half of `SequentialRecommender` (recsys/training/module.py),
kept apart so that each file holds one job: ranking every item for each user in item chunks
(bounded memory at any catalogue size), the metrics of one target (`evaluation.targets=next`) or of
a window of targets (`window`), the opt-in sampled metrics, the top-K list metrics, and the exact
reduction over processes (metric sums and counts all-reduced; per-user ranks gathered in user
order), so that 1 and N processes give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from recsys.errors import UserInputError
from recsys.evaluation.metrics import (
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

# Items scored at a time in evaluation (evaluation.item_chunk_size): B x this many float32 scores.
DEFAULT_ITEM_CHUNK_SIZE = 65536


class RankingEvaluation:
    """Validation and test steps of a LightningModule with a `network` and `num_items`."""

    def init_evaluation(self, ks: Sequence[int]) -> None:
        self.ks = tuple(ks)
        check_ks(self.ks, self.num_items)
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
        """The batch's event types, time gaps and timestamps, for a network that reads them."""
        features = {}
        if self.network.reads_events:
            features["events"] = batch["history_events"]
            features["gaps"] = batch["history_gaps"]
            features["target_event"] = batch["target_event"]
        if self.network.reads_times:
            features["times"] = batch["history_times"]
        return features

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
