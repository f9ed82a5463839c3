"""Deterministic seeding and vbpc's one ``DataLoader`` factory (also exported as ``vbpc.training.make_loader``)."""

from __future__ import annotations

import os
import random
from collections.abc import Sized
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

__all__ = ["make_dataloader", "make_loader", "seed_everything", "seed_worker"]


def seed_everything(seed: int, deterministic: Optional[bool] = None) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and all CUDA devices) with ``seed``.

    Args:
        seed: the seed (``0 <= seed < 2**32``, NumPy's limit).
        deterministic: ``True`` also makes torch use deterministic algorithms
            (``torch.use_deterministic_algorithms(True)``, cuDNN deterministic and not
            benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set; it must be
            set before the first cuBLAS call to take effect); ``False`` turns those off again;
            ``None`` (default) leaves them as they are.
    """
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic is not None:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for ``DataLoader``: seed ``random`` and NumPy from the worker's torch seed.

    torch seeds each worker with ``base_seed + worker_id`` (``base_seed`` drawn from the
    loader's generator); this carries that seed over to the other two RNGs, so augmentations
    that use them differ between workers and are reproducible.
    """
    del worker_id  # torch.initial_seed() already includes it
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    drop_last: bool = False,
    *,
    seed: Optional[int] = None,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    batched: Optional[bool] = None,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset``, seeded and, for in-memory data, fetching whole batches at once.

    With ``batched`` (default: on for a ``TensorDataset`` or a dataset whose class sets
    ``batch_indexable = True``, such as :class:`vbpc.data.SequentialBlocks`) the dataset is
    indexed once per batch with a list of indices, which avoids per-example indexing and
    collation (that otherwise dominates the run time of small models on CPU).  Otherwise the
    usual per-example fetch and default collation are used.

    Args:
        dataset: a map-style dataset.
        batch_size: examples per batch.
        shuffle: reshuffle every epoch.
        generator: seeds the shuffling (a CPU ``torch.Generator``); or give ``seed``.
        drop_last: drop the last incomplete batch.
        seed: shorthand for ``generator=torch.Generator().manual_seed(seed)``.
        num_workers: loader processes; when > 0 they are persistent across epochs, each runs
            :func:`seed_worker`, and their seeds come from a copy of the generator, so the
            batches (and their order) do not depend on ``num_workers``.
        device: where the batches will be used; pinned memory is used only for CUDA.
        batched: force batch indexing on or off.

    Without ``generator`` or ``seed`` the shuffling uses torch's global RNG (reproducible under
    :func:`seed_everything`); otherwise iterating the loader leaves the global RNG untouched.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either generator or seed, not both")
        generator = torch.Generator().manual_seed(int(seed))
    if batched is None:
        batched = isinstance(dataset, TensorDataset) or bool(getattr(dataset, "batch_indexable", False))
    pin = device is not None and torch.device(device).type == "cuda"
    if not isinstance(dataset, Sized):
        raise TypeError(f"make_loader needs a map-style dataset with a length, got {type(dataset).__name__}")
    base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    # Without workers the loader's base seed is unused, but drawing it would consume torch's global
    # RNG at every epoch (``iter(loader)``); a private generator keeps iteration RNG-neutral, so a
    # resumed run that re-creates its loaders stays bitwise equal to an uninterrupted one.
    extra: dict[str, Any] = {"generator": torch.Generator()}
    if num_workers > 0:
        worker_gen = None
        if generator is not None:  # a copy: drawing worker seeds must not shift the shuffling
            worker_gen = torch.Generator()
            worker_gen.set_state(generator.get_state())
        extra = {"worker_init_fn": seed_worker, "generator": worker_gen, "persistent_workers": True}
    if batched:
        return DataLoader(
            dataset, sampler=BatchSampler(base, batch_size, drop_last), batch_size=None,
            num_workers=num_workers, pin_memory=pin, **extra,
        )
    return DataLoader(
        dataset, sampler=base, batch_size=batch_size, drop_last=drop_last,
        num_workers=num_workers, pin_memory=pin, **extra,
    )


#: Alias of :func:`make_loader` (one implementation).
make_dataloader = make_loader
