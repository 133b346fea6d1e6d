"""Pure-PyTorch APM merging (2x2 gather or 4x self-copy, then LayerNorm(4C)), the reference of the Triton kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def apm_merge(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, reduce: bool, eps: float = 1e-5
) -> torch.Tensor:
    """x: (B, H, W, C) -> z: (B, ceil(H/2), ceil(W/2), 4C) if reduce else (B, H, W, 4C), in x's dtype.

    reduce: zero-pad H, W to even and concatenate Swin's 2x2 order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2],
    x[1::2,1::2]; keep: the four slots are the token itself. LayerNorm over 4C (ln_weight, ln_bias: (4C,)) in fp32.
    """
    c = x.shape[-1]
    if reduce:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        z = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    else:
        z = x.repeat(1, 1, 1, 4)
    return F.layer_norm(z.float(), (4 * c,), ln_weight.float(), ln_bias.float(), eps).to(x.dtype)
