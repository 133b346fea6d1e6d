"""Training data: a world-size-independent sample order, a resumable sampler, geo-aligned multi-modal views.

The order is a stream of positions p = 0, 1, 2, ...; position p is sample `perm_epoch[p % n]` with
epoch = p // n and a permutation seeded by (seed, epoch). Global step s consumes positions
[s * G, (s + 1) * G) for the fixed global batch G, whatever the world size; each rank takes its micro-batches
out of that window. A view's random crop/flip/frame choice is seeded by (seed, p), so a sample is cut the same
way on any number of ranks and after any resume.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataprep.errors import ChecksumError
from dataprep.reader import DatasetReader
from trainer.config import DataConfig, RunConfig, grad_accumulation
from trainer.model.config import IN_CHANS, MODALITIES
from trainer.views import (
    OpticalRecipe,
    augment_optical,
    db_to_power,
    frames,
    jitter_bands,
    orient,
    plan_cut,
    power_to_db,
    resample,
    sample_box,
    speckle,
)

_log = logging.getLogger(__name__)
MAX_CORRUPT_SKIPS = 64  # consecutive corrupt positions before a sample read gives up (a damaged dataset, not a chunk)


class StreamOrder:
    """Maps a stream position to a dataset index: a fresh seeded permutation every epoch."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("the dataset is empty: nothing to train on")
        self.n, self.seed = n, seed

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs live at an epoch boundary; the object lives all run
    def _perm(self, epoch: int) -> np.ndarray:
        # Kept as int32 when the indices fit (84 MB instead of 168 MB per epoch at 21M sets, per loader worker);
        # the same permutation either way.
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm.astype(np.int32) if self.n < 2**31 else perm

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
    """Stream position -> 2 global + `local_crops` local geo-aligned views of one image set (trainer/views.py).

    A view: `hr` (3, h, h) float32, `s2` (T2, 10, s, s), `s1` (T1, 2, s, s) normalised per band; `s2_doy` (T2,),
    `s1_doy` (T1,) int64 days of year; `has_hr` / `has_s2` / `has_s1` (bool); `box` (4,) float32 ground box,
    `flip_y`, `flip_x` (bool), `rot` (int64 0..3): the view's place on the ground (trainer/geometry.py). Global
    views have h = data.hr_crop, local views h = data.local_crop; s = h / (HR:S2 pixel ratio). Missing
    modalities are zeros with has_* False, so every rank runs the same graph (ZeRO buckets gradients in hook
    order) and losses mask them out. `reader` replaces the dataset's DatasetReader (tests use stand-ins).
    """

    def __init__(self, root: str, cfg: DataConfig, reader=None):
        self.reader = reader if reader is not None else DatasetReader(root)
        self.cfg = cfg
        self.order = StreamOrder(len(self.reader), cfg.seed)
        hr, s2 = self.reader.hr_size, self.reader.s2_size
        if hr % s2:
            raise ValueError(f"HR size {hr} is not a multiple of the S2 size {s2}: views cannot be geo-aligned")
        self.ratio = hr // s2
        for name in ("hr_crop", "local_crop"):
            size = getattr(cfg, name)
            if size % 32 or size % self.ratio:
                raise ValueError(f"data.{name}={size} must be a multiple of 32 (patch 4 x three halvings) and of "
                                 f"the HR/S2 pixel ratio {self.ratio}")
        # One photometric recipe per kind of view: global 1, global 2, local (DINO's asymmetric blur/solarisation).
        common = dict(jitter_p=cfg.hr_jitter_p, brightness=cfg.hr_brightness, contrast=cfg.hr_contrast,
                      saturation=cfg.hr_saturation, hue=cfg.hr_hue, grayscale_p=cfg.hr_grayscale_p,
                      blur_sigma=cfg.hr_blur_sigma)
        self._optical = [OpticalRecipe(**common, blur_p=cfg.hr_blur_p[0]),
                         OpticalRecipe(**common, blur_p=cfg.hr_blur_p[1], solarize_p=cfg.hr_solarize_p),
                         OpticalRecipe(**common, blur_p=cfg.hr_blur_p[2])]
        self._norm = {}
        for m in MODALITIES:  # a dataset without a modality may carry no statistics for it (never used then)
            st = self.reader.stats.get(m, {"mean": [0.0] * IN_CHANS[m], "std": [1.0] * IN_CHANS[m]})
            self._norm[m] = (np.asarray(st["mean"], np.float32)[:, None, None],
                             1 / (np.asarray(st["std"], np.float32)[:, None, None] + 1e-6))

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, position: int) -> dict:
        """Stream position -> sample. A sample whose stored chunk fails its crc32c is replaced by the next stream
        position (the same replacement on any world size and after any resume) and counted: `skipped_corrupt` is
        the number of corrupt positions passed over for this sample (0 almost always; a batch sums it)."""
        for skipped in range(MAX_CORRUPT_SKIPS):
            try:
                out = self._sample(position + skipped)
            except ChecksumError as e:
                _log.warning("stream position %d: corrupt sample skipped: %s", position + skipped, e)
                continue
            out["position"], out["skipped_corrupt"] = position, skipped
            return out
        raise RuntimeError(f"stream positions {position}..{position + MAX_CORRUPT_SKIPS - 1} are all corrupt: the "
                           f"dataset is damaged; run `python -m dataprep verify` on it")

    def _sample(self, position: int) -> dict:
        i = self.order.index(position)
        meta = self.reader.meta(i)
        n_views = 2 + self.cfg.local_crops
        # Two streams per view, both seeded by (seed, position, view): view v is cut the same way whatever the
        # number of local crops, and switching photometric ops off leaves every box, flip and date unchanged.
        seed = (self.cfg.seed, 1, position)
        specs = [self._plan(np.random.default_rng([*seed, v, 0]), v, meta) for v in range(n_views)]
        src = self._read(i, meta, specs)
        views = [self._cut(spec, src, np.random.default_rng([*seed, v, 1]), v) for v, spec in enumerate(specs)]
        return {"index": i, "position": position, "label": int(meta["label"]), "views": views[:2],
                "local_views": views[2:]}

    def _plan(self, rng: np.random.Generator, v: int, meta: dict) -> dict:
        """The random geometry and dates of view v: box, flips, turns, per-modality resampling and frames."""
        cfg = self.cfg
        local = v >= 2
        box = sample_box(rng, cfg.local_scale if local else cfg.global_scale, cfg.aspect)
        flip_y, flip_x = (bool(f) for f in rng.random(2) < 0.5) if cfg.flip else (False, False)
        rot = int(rng.integers(4)) if cfg.rotate else 0
        n = cfg.local_crop if local else cfg.hr_crop
        spec = {"box": box, "flip_y": flip_y, "flip_x": flip_x, "rot": rot, "n": n, "s": n // self.ratio,
                "hr": plan_cut(box, self.reader.hr_size, n)}
        sc = plan_cut(box, self.reader.s2_size, n // self.ratio)  # S1 shares the S2 grid
        for m, k in (("s2", cfg.s2_frames), ("s1", cfg.s1_frames)):
            dates = np.asarray(meta[f"{m}_dates"])
            spec[m] = sc
            spec[f"{m}_frames"] = sel = frames(rng, dates, k) if len(dates) else None
            spec[f"{m}_doy"] = day_of_year(dates[sel]) if len(dates) else None
        return spec

    def _read(self, i: int, meta: dict, specs: list[dict]) -> dict:
        """One read per modality: the union of every view's pixel span (and dates), as float32. The modalities'
        reads are issued together (DatasetReader.read_many: in flight at once)."""
        reqs, keys = [], []
        for m in MODALITIES:
            if m == "hr" and not meta["has_hr"] or m != "hr" and specs[0][f"{m}_frames"] is None:
                continue
            spans = np.array([s[m].span for s in specs])
            box = (int(spans[:, 0].min()), int(spans[:, 1].min()), int(spans[:, 2].max()), int(spans[:, 3].max()))
            uniq = None if m == "hr" else np.unique(np.concatenate([s[f"{m}_frames"] for s in specs]))
            reqs.append((m, box, None if uniq is None else uniq.tolist()))
            keys.append((m, box, uniq))
        out = {}
        many = getattr(self.reader, "read_many", None)  # stand-in readers (tests) may offer only `read`
        arrs = many(i, reqs) if many is not None else [self.reader.read(i, *r) for r in reqs]
        for (m, box, uniq), arr in zip(keys, arrs, strict=True):
            arr = arr.astype(np.float32)
            if m == "s1":  # resample (average) backscatter as power, not dB: that is multi-looking
                arr = db_to_power(arr)
            out[m] = (arr, box[:2], uniq)
        return out

    def _cut(self, spec: dict, src: dict, rng: np.random.Generator, v: int) -> dict:
        """View v from the sample's pixels: resample, orient alike, then each modality's photometric ops."""
        cfg, aug = self.cfg, self.cfg.photometric
        # One sub-stream per modality: a set's S2 draws do not depend on whether it has HR, or on HR's outcomes.
        rngs = dict(zip(MODALITIES, (np.random.default_rng(x) for x in rng.integers(2**63, size=3)), strict=True))
        flips = {"flip_y": spec["flip_y"], "flip_x": spec["flip_x"], "rot": spec["rot"]}
        view = {"box": spec["box"], **flips, "rot": np.int64(spec["rot"])}
        n, s = spec["n"], spec["s"]
        view["has_hr"] = "hr" in src
        if view["has_hr"]:
            arr, origin, _ = src["hr"]
            x = orient(resample(arr, spec["hr"], origin), **flips) * np.float32(1 / 255)
            if aug:
                x = augment_optical(x, rngs["hr"], self._optical[min(v, 2)])
            view["hr"] = self._normalise("hr", x * np.float32(255))
        else:
            view["hr"] = np.zeros((3, n, n), np.float32)
        for m, k in (("s2", cfg.s2_frames), ("s1", cfg.s1_frames)):
            view[f"has_{m}"] = m in src
            if m not in src:
                view[m], view[f"{m}_doy"] = np.zeros((k, IN_CHANS[m], s, s), np.float32), np.zeros(k, np.int64)
                continue
            arr, origin, uniq = src[m]
            sel = spec[f"{m}_frames"]
            x = orient(resample(arr, spec[m], origin, index=np.searchsorted(uniq, sel)), **flips)
            r = rngs[m]
            p = r.random(2)
            if m == "s2" and aug and p[0] < cfg.s2_jitter_p:
                x = jitter_bands(x, r, cfg.s2_brightness, cfg.s2_contrast)
            if m == "s1":  # x is linear power here
                if aug and p[0] < cfg.s1_speckle_p:
                    x = speckle(x, r, cfg.s1_looks)
                x = power_to_db(x)
                if aug and p[1] < cfg.s1_gain_p:
                    x = x + np.float32(r.uniform(-cfg.s1_gain_db, cfg.s1_gain_db))
            view[m] = self._normalise(m, x)
            view[f"{m}_doy"] = spec[f"{m}_doy"]
        return view

    def _normalise(self, m: str, arr: np.ndarray) -> np.ndarray:
        mean, inv_std = self._norm[m]
        return ((arr - mean) * inv_std).astype(np.float32, copy=False)


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


# Geometry stays fp32: a bf16 ground box is off by up to 1/512 of the extent (half an HR pixel of a 256 px set,
# four of a 2048 px one), which would misplace the pixel-level terms' RoIAlign samples.
FP32_KEYS = frozenset({"box"})


def to_device(batch, device: torch.device, dtype: torch.dtype):
    """Move a collated batch to `device`, floating tensors cast to `dtype` (those under FP32_KEYS kept fp32)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, dtype=dtype if batch.is_floating_point() else None, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, torch.float32 if k in FP32_KEYS else dtype) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device, dtype) for v in batch]
    return batch
