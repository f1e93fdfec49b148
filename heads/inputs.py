"""The two kinds of training inputs behind one interface: cached features (train-head) and
stored crops re-encoded every step (finetune). An epoch asks for its batches, validation for
the val split's log-probabilities; neither needs to know which kind it has."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from cache.core.errors import CaerError
from cache.core.runtime import autocast
from heads.data import FeatureBank, PixelClips, Splits


class TrainingInputs:
    """``train_data`` is what the epoch's sampler draws positions of; ``batches`` yields
    ``(face, context, y, store rows)`` micro-batches; ``val_log_probs`` scores the val split
    (middle frame, no flip)."""

    train_data = None

    def batches(self, sampler, micro_batch: int, epoch: int, workers: int, device):
        raise NotImplementedError

    def val_log_probs(self, model, device, precision: str, config) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class CachedFeatures(TrainingInputs):
    """train-head: the train and val clips' features, read from the store once."""

    def __init__(self, store, splits: Splits, seed: int):
        self.splits, self.seed = splits, seed
        self.bank = FeatureBank(store, np.concatenate([splits.train, splits.val]), with_flip=True)
        self.train_data = range(len(splits.train))  # positions in the bank

    def batches(self, sampler, micro_batch: int, epoch: int, workers: int, device):
        order = list(sampler)
        return (self._batch(order[i:i + micro_batch], epoch)
                for i in range(0, len(order), micro_batch))

    def _batch(self, positions, epoch: int):
        face, context, y = self.bank.batch(positions, train=True, seed=self.seed, epoch=epoch)
        return face, context, y, [int(self.bank.rows[p]) for p in positions]

    def val_log_probs(self, model, device, precision: str, config):
        n_train, n_val = len(self.splits.train), len(self.splits.val)
        positions = torch.arange(n_train, n_train + n_val)
        chunks, labels = [], []
        for i in range(0, len(positions), 256):
            face, context, y = self.bank.batch(positions[i:i + 256], train=False)
            chunks.append(model(face.to(device), context.to(device)).float().log_softmax(-1).cpu())
            labels.append(y)
        return torch.cat(chunks), torch.cat(labels)


class StoredCrops(TrainingInputs):
    """finetune: the stored 224x224 crops, augmented in DataLoader workers."""

    def __init__(self, config, store, splits: Splits, seed: int):
        if not store.fingerprint.get("pixels"):
            raise CaerError(f"--cache {config.cache} holds no stored crops: finetune re-encodes "
                            f"them; build the cache with `python cli.py extract ... --pixels`")
        self.store, self.splits = store, splits
        self.train_data = PixelClips(config.cache, splits.train,
                                     store.clip_table(["label"])["label"].to_numpy()[splits.train], train=True,
                                     seed=seed, candidates=int(store.fingerprint["candidates"]),
                                     augment=config.augment)

    def batches(self, sampler, micro_batch: int, epoch: int, workers: int, device):
        self.train_data.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            self.train_data, batch_size=micro_batch, sampler=sampler, num_workers=workers,
            persistent_workers=False, pin_memory=device.type == "cuda")

    def val_log_probs(self, model, device, precision: str, config):
        from heads.evaluate import predict_rows

        with autocast(device, precision):
            probs = torch.from_numpy(predict_rows(model, self.store, self.splits.val, pixels=True,
                                                  batch_size=config.batch_size, device=device,
                                                  progress=not config.quiet))
        y = torch.as_tensor(self.store.clip_table(["label"])["label"].to_numpy()[self.splits.val])
        return probs.clamp_min(1e-12).log(), y


def training_inputs(config, store, splits: Splits, seed: int) -> TrainingInputs:
    """The inputs the config's recipe trains on (its type says which)."""
    if config.reencodes_crops:
        return StoredCrops(config, store, splits, seed)
    return CachedFeatures(store, splits, seed)


def epoch_sampler(inputs: TrainingInputs, config, n_train: int, world: int, rank: int, seed: int):
    """This rank's share of each epoch's one permutation of the train clips."""
    sampler = torch.utils.data.DistributedSampler(inputs.train_data, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=False)
    if config.drop_last:
        sampler = full_batches_only(sampler, n_train, config.batch_size, world)
    return sampler


class FirstOfEpoch(torch.utils.data.Sampler):
    """The first ``n`` indices of a (Distributed)Sampler's epoch."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n)

    def __len__(self) -> int:
        return self.n


def full_batches_only(sampler, n_train: int, batch_size: int, world: int) -> FirstOfEpoch:
    """--drop-last: keep the epoch's full global batches. Rank r's i-th index is position
    r + i * world of the epoch's one permutation, so each rank keeping its first
    steps * batch_size / world indices keeps exactly the first steps global batches."""
    steps = n_train // batch_size
    if steps == 0:
        raise CaerError(f"--drop-last: {n_train} training clips are fewer than --batch-size "
                        f"{batch_size}, so every batch would be dropped")
    return FirstOfEpoch(sampler, steps * batch_size // world)
