"""The evaluation half of the one data module: which users each split ranks, and their batches.

`EvaluationBatches` is mixed into `SequenceDataModule` (recsys/data/datamodule.py), whose
constructor sets what it reads (the split, `data.*` and `evaluation.*` keys). It chooses the
evaluated users and their targets once per split (recsys/data/evaluated.py: users left out and
counted, window targets, cold items), describes the protocol for metrics.json, and serves the
validation and test queries (datasets.py's `EvalUsers`) in batches, each user exactly once over
all processes.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from recsys.data.batching import LengthBucketBatchSampler, RankBatches
from recsys.data.datasets import EvalUsers
from recsys.data.evaluated import EvaluatedUsers, evaluated_users, evaluated_windows, seen_targets
from recsys.data.split import SPLITS, TimeSplit, protocol_text
from recsys.errors import UserInputError


class EvaluationBatches:
    """Validation and test users, targets and batches of a SequenceDataModule."""

    def protocol(self) -> str:
        """The evaluation protocol in words, for metrics.json."""
        time_split = None
        if isinstance(self.split, TimeSplit):
            cold = {
                "drop": "targets without a training event left out",
                "keep": "targets without a training event counted as misses",
                "rank": "items without a training event ranked like the others",
            }
            time_split = f"{self.split.cuts.describe()}; {cold[self.cold_items]}"
        text = protocol_text(
            self.target_events, self.exclude_events, self.seen_items, time_split, self.targets
        )
        if self._held_out is not None:
            text += (
                f"; {int(self._held_out.sum())} items (evaluation.cold_items_share={self.cold_items_share}, "
                f"seed {self.seed}) held out of training, their targets ranked as cold"
            )
        return text

    def _exclude_codes(self) -> list[int] | None:
        """Event type ids whose items count as seen (None: every event's)."""
        if self.exclude_events is None:
            return None
        return self.data.event_ids(self.exclude_events, "data.exclude_events")

    def seen_targets(self, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(len(users),) bool: the target item at `positions` is a seen item of the user (of the
        data.exclude_events types, when set); see recsys/data/evaluated.py."""
        self.setup()
        return seen_targets(self.data, users, positions, self._exclude_codes(), self.hide_target_item)

    def evaluated(self, split: str) -> EvaluatedUsers:
        """The users `split` ranks, their targets and counts (recsys/data/evaluated.py)."""
        self.setup()
        if split in self._evaluated:  # asked for at every validation and test pass
            return self._evaluated[split]
        if self.targets == "window":
            chosen = evaluated_windows(
                self.data,
                self.split,
                split,
                self.name,
                self.seen_items,
                self._exclude_codes(),
                self.cold_items,
                self.max_users,
                self.seed,
            )
        else:
            chosen = evaluated_users(
                self.data,
                self.split,
                split,
                self.name,
                self.seen_items,
                self._exclude_codes(),
                self.hide_target_item,
                self.cold_items,
                self.max_users,
                self.seed,
            )
        if self._held_out is not None:  # evaluation.cold_items_share: its targets counted
            chosen.counts[f"{split}/cold_targets"] = int(
                self._held_out[self.data.items[chosen.positions]].sum()
            )
        self._evaluated[split] = chosen
        return chosen

    def evaluated_users(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target positions) evaluated on `split`: every user whose target has a history
        (all users under plain leave-one-out; see EventSplit), but those that
        recsys/data/evaluated.py leaves out (counted in `evaluation_counts`)."""
        chosen = self.evaluated(split)
        return chosen.users, chosen.positions

    def repeat_targets(self, split: str) -> np.ndarray:
        """(num_users,) bool: the user's `split` target is a seen item (see `seen_targets`), as
        found when the split's users were chosen."""
        return self.evaluated(split).repeat

    def evaluation_counts(self, split: str) -> dict[str, float]:
        """For metrics.json: `<split>/users` evaluated (every user of the split, not the
        data.val_users subset; under evaluation.max_users, `<split>/users_ranked` of them in a
        seeded sample, described by `<split>/users_sample`), `<split>/repeat_targets` (users whose
        target is a seen item) and their share among the split's users, `<split>/users_left_out`
        (those of them left out: all under evaluation.seen_items=exclude, none otherwise); under a
        time split `<split>/cold_targets` and `<split>/cold_users`."""
        return dict(self.evaluated(split).counts)

    def validation_users(self) -> np.ndarray | None:
        """The fixed, seeded subset of users validated on when data.val_users is set (else None)."""
        self.setup()
        if self.val_users is None or self.val_users >= self.data.num_users:
            return None
        rng = np.random.default_rng([self.seed, 1])  # independent of the training order's stream
        return np.sort(rng.choice(self.data.num_users, self.val_users, replace=False))

    def eval_dataloader(self, split: str, all_users: bool = False) -> DataLoader:
        """Batches of (user, history, target, exclude). Validation during training uses the
        data.val_users subset if set; test, and `all_users=True`, always use every user.

        Users in index order, eval_batch_size at a time; with several processes each process gets
        every world_size-th of these batches (each user exactly once, nothing padded)."""
        self.setup()
        if split not in SPLITS:
            raise UserInputError(f"split: {split!r} is not one of {list(SPLITS)}")
        evaluated = self.evaluated(split)
        users, target_pos, windows = evaluated.users, evaluated.positions, evaluated.windows
        subset = self.validation_users() if split == "val" and not all_users else None
        if subset is not None:
            chosen = np.isin(users, subset)
            users, target_pos = users[chosen], target_pos[chosen]
            windows = None if windows is None else windows.of(np.flatnonzero(chosen))
        users = EvalUsers(
            self.data,
            users,
            target_pos,
            self.max_len,
            self._exclude_codes(),
            self._gaps,
            self.hide_target_item,
            width_multiple=self.width_multiple,
            exclude_seen=self.seen_items != "keep",
            not_candidates=self._not_candidates(),
            misses=None if evaluated.misses is None else evaluated.misses[users],
            windows=windows,
            batch_times=self.batch_times,
        )
        sampler = LengthBucketBatchSampler(
            np.zeros(len(users)), self.eval_batch_size, shuffle=False, bucketing=False
        )
        rank, world_size = self._process_share()
        if world_size > 1:
            return self._loader(users, RankBatches(sampler, rank, world_size, pad=False))
        return self._loader(users, sampler)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        # Every user; evaluate.py sets test_split = "val" to test a checkpoint on the validation targets.
        return self.eval_dataloader(self.test_split, all_users=True)
