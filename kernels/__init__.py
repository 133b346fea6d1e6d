"""Triton kernels for the three hot ops of SkySense V2, with one dispatch point.

Each public function picks Triton when its tensors are on CUDA and Triton is installed, else the pure-PyTorch
reference (same signature, same semantics). One override, the programmatic switch `set_backend(...)` (used by the
trainer config) taking precedence over the environment variable `SKYSENSE_KERNELS`:

- ``auto`` (default): Triton for CUDA tensors (compute capability >= 8.0), reference elsewhere (CPU, meta, Triton
  missing, or a shape the kernel does not take: window > 8, head dim > 64, APM C > 4096);
- ``triton``: always Triton; CPU tensors then need ``TRITON_INTERPRET=1`` set before the kernel modules load;
- ``reference``: always the reference.

Importing `kernels` never imports Triton: the kernel modules load on the first Triton call.

Note: the subpackages `kernels/window_attention/` and `kernels/apm_merge/` share their names with the dispatching
functions below; the functions win as attributes of `kernels`, so import those modules with
``from kernels.window_attention import reference`` (resolved through ``sys.modules``), never ``import a.b.c``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

# Import the op packages (light: no Triton) BEFORE defining the functions of the same name, so that importing a
# submodule later never rebinds `kernels.window_attention` / `kernels.apm_merge` to the package.
from kernels import apm_merge as _apm_pkg  # noqa: F401
from kernels import moe_routing as _moe_pkg  # noqa: F401
from kernels import window_attention as _wa_pkg  # noqa: F401
from kernels.apm_merge import reference as _apm_ref
from kernels.moe_routing import reference as _moe_ref
from kernels.moe_routing.reference import Route
from kernels.window_attention import reference as _wa_ref

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "SKYSENSE_KERNELS"
_backend: str | None = None  # set_backend(); None defers to the environment


def set_backend(name: str | None) -> None:
    """Select 'auto', 'triton' or 'reference' for this process (None: back to $SKYSENSE_KERNELS, default auto)."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend in force: set_backend() if called, else $SKYSENSE_KERNELS, else 'auto'."""
    name = _backend if _backend is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"${ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def triton_available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _cuda_ok(t: torch.Tensor) -> bool:
    # Triton's NVIDIA backend needs compute capability >= 8.0 for bf16 and our tl.dot shapes; AMD (HIP) is allowed.
    if t.device.type != "cuda":
        return False
    if torch.version.hip is not None:
        return True
    return torch.cuda.get_device_capability(t.device) >= (8, 0)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors runs the Triton kernels under the current backend."""
    name = get_backend()
    if name == "reference":
        return False
    if name == "auto":
        return triton_available() and all(_cuda_ok(t) for t in tensors)
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed")
    if any(t.device.type == "cpu" for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before the kernels are first used")
    if any(t.device.type not in ("cpu", "cuda") for t in tensors):
        raise RuntimeError(f"Triton kernels cannot run on {[str(t.device) for t in tensors]}")
    return True


def _function(op: str):
    """The autograd module of one op, imported (and its Triton kernels compiled lazily) on first use."""
    return importlib.import_module(f"kernels.{op}.function")


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    bias_table: torch.Tensor,
    window: int,
    shift: int,
) -> torch.Tensor:
    """SwinV2 cosine attention in (shifted) windows. q, k, v: (B, H, W, nh, d) -> (B, H, W, nh, d).

    logit_scale: (nh,); bias_table: (nh, (2*window-1)**2). See kernels/window_attention/reference.py.
    """
    if use_triton(q, k, v, logit_scale, bias_table):
        fn = _function("window_attention")
        if fn.supported(q, window) or get_backend() == "triton":
            return fn.window_attention(q, k, v, logit_scale, bias_table, window, shift)
    return _wa_ref.window_attention(q, k, v, logit_scale, bias_table, window, shift)


def apm_merge(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, reduce: bool, eps: float = 1e-5
) -> torch.Tensor:
    """2x2 gather (reduce) or 4x self-copy (keep) + LayerNorm(4C). x: (B, H, W, C) -> (B, H', W', 4C)."""
    if use_triton(x, ln_weight, ln_bias):
        fn = _function("apm_merge")
        if fn.supported(x) or get_backend() == "triton":
            return fn.apm_merge(x, ln_weight, ln_bias, reduce, eps)
    return _apm_ref.apm_merge(x, ln_weight, ln_bias, reduce, eps)


def top1_route(x: torch.Tensor, gate_weight: torch.Tensor, capacity: int, drop_tokens: bool = True) -> Route:
    """Softmax gate (fp32), argmax expert, capacity positions, counts, aux/z losses. x: (N, D), gate_weight: (E, D)."""
    if use_triton(x, gate_weight):
        return _function("moe_routing").top1_route(x, gate_weight, capacity, drop_tokens)
    return _moe_ref.top1_route(x, gate_weight, capacity, drop_tokens)


def moe_dispatch(
    x: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Scatter kept tokens to their expert slots. x: (N, D) -> (E, capacity, D), zeros in unused slots."""
    if use_triton(x, expert, position, kept):
        return _function("moe_routing").moe_dispatch(x, expert, position, kept, num_experts, capacity)
    return _moe_ref.moe_dispatch(x, expert, position, kept, num_experts, capacity)


def moe_combine(
    y: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """Gather expert outputs back to tokens scaled by the gate. y: (E, capacity, D) -> (N, D), 0 for dropped."""
    if use_triton(y, expert, position, kept, gate):
        return _function("moe_routing").moe_combine(y, expert, position, kept, gate)
    return _moe_ref.moe_combine(y, expert, position, kept, gate)


__all__ = [
    "BACKENDS",
    "Route",
    "apm_merge",
    "get_backend",
    "moe_combine",
    "moe_dispatch",
    "set_backend",
    "top1_route",
    "triton_available",
    "use_triton",
    "window_attention",
]
