"""Training data: a world-size-independent sample order, a resumable sampler, geo-aligned multi-modal views.

The order is a stream of positions p = 0, 1, 2, ...; position p is sample `perm_epoch[p % n]` with
epoch = p // n and a permutation seeded by (seed, epoch). Global step s consumes positions
[s * G, (s + 1) * G) for the fixed global batch G, whatever the world size; each rank takes its micro-batches
out of that window. A view's random crop/flip/frame choice is seeded by (seed, p), so a sample is cut the same
way on any number of ranks and after any resume.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataprep.reader import DatasetReader
from trainer.config import DataConfig, RunConfig, grad_accumulation
from trainer.model.config import MODALITIES


class StreamOrder:
    """Maps a stream position to a dataset index: a fresh seeded permutation every epoch."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("the dataset is empty: nothing to train on")
        self.n, self.seed = n, seed

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs live at an epoch boundary; the object lives all run
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def index(self, position: int) -> int:
        return int(self._perm(position // self.n)[position % self.n])


class ResumableSampler(Sampler[int]):
    """This rank's stream positions, micro-batch after micro-batch, from global step `start_step` on (endless).

    Within global step s, micro-batch a of rank r holds positions
    s*G + (a*world + r)*micro + [0, micro), for a in [0, accumulation).
    """

    def __init__(self, *, global_batch: int, micro_batch: int, rank: int, world_size: int, start_step: int = 0):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not divisible by micro x world = "
                             f"{micro_batch} x {world_size}")
        self.g, self.micro, self.rank, self.world = global_batch, micro_batch, rank, world_size
        self.accum = global_batch // (micro_batch * world_size)
        self.start_step = start_step

    def positions(self, step: int) -> list[int]:
        """All positions this rank reads during global step `step`, in order."""
        out = []
        for a in range(self.accum):
            first = step * self.g + (a * self.world + self.rank) * self.micro
            out.extend(range(first, first + self.micro))
        return out

    def __iter__(self):
        step = self.start_step
        while True:
            yield from self.positions(step)
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its progress hints
        return 2**62

    def state_dict(self) -> dict:
        return {"start_step": self.start_step}


def day_of_year(days_since_epoch: np.ndarray) -> np.ndarray:
    """(T,) int days since 1970-01-01 -> (T,) int64 day of year in [0, 365]."""
    d = np.asarray(days_since_epoch, dtype="int64").astype("datetime64[D]")
    return (d - d.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64)


class PretrainViews(Dataset):
    """Stream position -> two global geo-aligned views of one image set, every modality present or zero-filled.

    A view: `hr` (3, h, h) float32, `s2` (T2, 10, s, s), `s1` (T1, 2, s, s), `s2_doy` (T2,), `s1_doy` (T1,),
    and `has_hr` / `has_s2` / `has_s1` (bool). Missing modalities are zeros with has_* False, so every rank runs
    the same graph (ZeRO buckets gradients in hook order) and losses mask them out.
    """

    def __init__(self, root: str, cfg: DataConfig):
        self.reader = DatasetReader(root)
        self.cfg = cfg
        self.order = StreamOrder(len(self.reader), cfg.seed)
        hr, s2 = self.reader.hr_size, self.reader.s2_size
        if hr % s2:
            raise ValueError(f"HR size {hr} is not a multiple of the S2 size {s2}: views cannot be geo-aligned")
        self.ratio = hr // s2
        if cfg.hr_crop % self.ratio or cfg.hr_crop > hr:
            raise ValueError(f"data.hr_crop={cfg.hr_crop} must be <= the HR size {hr} and a multiple of the "
                             f"HR/S2 pixel ratio {self.ratio}")
        self.s_crop = cfg.hr_crop // self.ratio
        self._norm = {m: (np.asarray(self.reader.stats[m]["mean"], np.float32)[:, None, None],
                          np.asarray(self.reader.stats[m]["std"], np.float32)[:, None, None] + 1e-6)
                      for m in MODALITIES}

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, position: int) -> dict:
        rng = np.random.default_rng([self.cfg.seed, 1, position])
        i = self.order.index(position)
        meta = self.reader.meta(i)
        return {"index": i, "position": position, "label": int(meta["label"]),
                "views": [self._view(i, meta, rng) for _ in range(2)]}

    def _frames(self, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
        return np.sort(rng.choice(n, size=k, replace=n < k))

    def _view(self, i: int, meta: dict, rng: np.random.Generator) -> dict:
        s, r, size = self.s_crop, self.ratio, self.reader.s2_size
        y0, x0 = (int(v) for v in rng.integers(0, size - s + 1, size=2))
        flip_y, flip_x = (bool(v) for v in rng.random(2) < 0.5)
        view = {}
        hr_box = (y0 * r, x0 * r, (y0 + s) * r, (x0 + s) * r)
        view["has_hr"] = bool(meta["has_hr"])
        view["hr"] = (self._normalise("hr", self.reader.read(i, "hr", box=hr_box)) if view["has_hr"]
                      else np.zeros((3, s * r, s * r), np.float32))
        for m, k, bands in (("s2", self.cfg.s2_frames, 10), ("s1", self.cfg.s1_frames, 2)):
            dates = np.asarray(meta[f"{m}_dates"])
            view[f"has_{m}"] = len(dates) > 0
            if len(dates):
                frames = self._frames(rng, len(dates), k)
                uniq, inverse = np.unique(frames, return_inverse=True)
                arr = self.reader.read(i, m, box=(y0, x0, y0 + s, x0 + s), frames=uniq.tolist())[inverse]
                view[m] = self._normalise(m, arr)
                view[f"{m}_doy"] = day_of_year(dates[frames])
            else:
                view[m] = np.zeros((k, bands, s, s), np.float32)
                view[f"{m}_doy"] = np.zeros(k, np.int64)
        for m in MODALITIES:  # one flip for the whole view keeps the modalities geo-aligned
            if flip_y:
                view[m] = np.ascontiguousarray(np.flip(view[m], -2))
            if flip_x:
                view[m] = np.ascontiguousarray(np.flip(view[m], -1))
        return view

    def _normalise(self, m: str, arr: np.ndarray) -> np.ndarray:
        mean, std = self._norm[m]
        return ((arr.astype(np.float32) - mean) / std).astype(np.float32)


def build_loader(cfg: RunConfig, *, rank: int, world_size: int, start_step: int, pin_memory: bool = False
                 ) -> DataLoader:
    """An endless loader of this rank's micro-batches, resuming at global step `start_step`."""
    grad_accumulation(cfg, world_size)  # fails early with a clear message on bad batch arithmetic
    dataset = PretrainViews(cfg.data.path, cfg.data)
    sampler = ResumableSampler(global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                               rank=rank, world_size=world_size, start_step=start_step)
    workers = cfg.data.num_workers
    return DataLoader(dataset, batch_size=cfg.train.micro_batch, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, prefetch_factor=cfg.data.prefetch_factor if workers else None,
                      pin_memory=pin_memory, drop_last=True,
                      # Its own generator: creating the iterator must not draw from the global RNG, which a resumed
                      # run restores from the checkpoint just before (an extra draw would fork the RNG stream).
                      generator=torch.Generator().manual_seed(cfg.data.seed))


def to_device(batch, device: torch.device, dtype: torch.dtype):
    """Move a collated batch to `device`, floating tensors cast to `dtype`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, dtype=dtype if batch.is_floating_point() else None, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device, dtype) for v in batch]
    return batch
