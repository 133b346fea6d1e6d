"""In-training k-NN of the teacher backbone on a small labelled folder, logged as `health/knn_top1`.

The labelled images are read and normalised once (train-split statistics); each evaluation extracts features under
`torch.random.fork_rng` in eval mode and restores the modules' modes, so training sees the same RNG and modules
with evaluation on or off. Every rank runs it (under expert parallelism the MoE layers exchange tokens, so all
ranks of an expert group must take part); only rank 0 logs. No other collective is taken.
"""

from __future__ import annotations

import time

import torch

from trainer.config import EvalConfig


class InTrainingEval:
    """`evaluator(backbone) -> {"knn_top1", "knn_top5", "knn_seconds"}` on the configured labelled set."""

    def __init__(self, cfg: EvalConfig, device: torch.device):
        from trainer.evaluate import band_stats, normalise
        from trainer.labelled import load_folder
        from trainer.probes import stratified_split

        self.cfg, self.device = cfg, device
        modality = cfg.modality or None
        if cfg.train and cfg.val:
            train = load_folder(cfg.train, modality=modality, size=cfg.size)
            val = load_folder(cfg.val, modality=modality, size=cfg.size)
        elif cfg.data:
            full = load_folder(cfg.data, modality=modality, size=cfg.size)
            first, second = stratified_split(full.labels, cfg.split, seed=0)
            train, val = full.subset(first), full.subset(second)
        else:
            raise ValueError("eval.every > 0 needs eval.data (one labelled folder) or eval.train and eval.val")
        # Folders are ordered by class: a prefix would drop whole classes, a stratified subset keeps them all.
        train, val = (d if len(d) <= cfg.max_images else
                      d.subset(stratified_split(d.labels, cfg.max_images / len(d), seed=0)[1]) for d in (train, val))
        if train.classes != val.classes:
            raise ValueError(f"eval.train and eval.val name different classes ({train.classes} vs {val.classes})")
        mean, std = band_stats(train.images)
        self.modality, self.num_classes = train.modality, len(train.classes)
        self.train_x, self.val_x = normalise(train.images, mean, std), normalise(val.images, mean, std)
        self.train_y, self.val_y = train.labels, val.labels

    def __call__(self, backbone: torch.nn.Module) -> dict[str, float]:
        from trainer.evaluate import extract_features
        from trainer.probes import knn

        start = time.perf_counter()
        feats = [extract_features(backbone, x, self.modality, device=self.device) for x in (self.train_x, self.val_x)]
        result = knn(feats[0], self.train_y, feats[1], self.val_y, k=self.cfg.k, num_classes=self.num_classes)
        return {f"knn_{k}": v for k, v in result.items()} | {"knn_seconds": time.perf_counter() - start}
