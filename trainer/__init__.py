"""SkySense V2 pretraining: `python -m trainer.pretrain`, `python -m trainer.export`, `trainer.load_pretrained`.

Nothing is imported here eagerly: `import trainer` stays cheap (no torch, no DeepSpeed) until a function is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from trainer.model import SkySenseV2


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> SkySenseV2:
    """An export of `python -m trainer.export` -> SkySenseV2 in eval mode on `device`; no DeepSpeed, no pickle."""
    from trainer.weights import load_pretrained as _load

    return _load(path, device)


__all__ = ["load_pretrained"]
