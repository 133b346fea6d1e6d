"""Triton kernels for the three hot ops of SkySense V2, with one dispatch point.

Each public function picks Triton when its tensors are on CUDA and Triton is installed, else the pure-PyTorch
reference (same signature, same semantics). One override, the programmatic switch `set_backend(...)` (used by the
trainer config) taking precedence over the environment variable `SKYSENSE_KERNELS`:

- ``auto`` (default): Triton for CUDA tensors (compute capability >= 8.0), reference elsewhere (CPU, meta, Triton
  missing, or a shape the kernel does not take: window > 8, head dim > 64, APM C > 4096). Before its first Triton
  call on a (device, dtype), ``auto`` smoke-launches every kernel there (`kernels/smoke.py`, forward and backward
  against the reference); if one fails (e.g. "device kernel image is invalid" on a driver older than Triton's
  ptxas) the whole process falls back to the PyTorch path, with one `KernelFallbackWarning`;
- ``triton``: always Triton, no smoke launch (a failing kernel raises); CPU tensors then need
  ``TRITON_INTERPRET=1`` set before the kernel modules load;
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
import warnings

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
# Smoke launches of `auto`: (device, dtype) -> {op: None if it passed, else why}; one failure disables Triton.
_smoke: dict[tuple[str, torch.dtype], dict[str, str | None]] = {}
_fallback: str | None = None  # why `auto` stopped using Triton in this process (None: it did not)


class KernelFallbackWarning(RuntimeWarning):
    """`auto` found a Triton kernel that does not work on this machine and uses the PyTorch path instead."""


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


def check_kernels(device: torch.device | str, dtype: torch.dtype) -> dict[str, str | None]:
    """Smoke-launch every kernel on `device` in `dtype` (tiny shapes, fwd + bwd vs reference), cached per pair.

    Returns {op: None if it works, else the reason}. Used by `auto` before its first Triton call; callable directly
    (launch/gpu-check.sh reports it). Needs CUDA, or CPU with TRITON_INTERPRET=1.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key not in _smoke:
        from kernels import smoke

        _smoke[key] = smoke.run(device, dtype)
    return _smoke[key]


def fallback_reason() -> str | None:
    """Why `auto` is using the PyTorch path although Triton could run here, or None."""
    return _fallback


def _smoke_ok(t: torch.Tensor) -> bool:
    global _fallback
    if _fallback is not None:
        return False
    if torch.compiler.is_compiling():  # never launch kernels while tracing; the eager run decided already
        return True
    failed = {op: why for op, why in check_kernels(t.device, t.dtype).items() if why is not None}
    if not failed:
        return True
    _fallback = f"Triton smoke launch failed on {t.device} ({t.dtype}): " + "; ".join(
        f"{op}: {why}" for op, why in failed.items()
    )
    warnings.warn(
        f"{_fallback}. kernels=auto falls back to the PyTorch path (trainer/model/ops.py) for this process. "
        "If the kernel image is invalid, the driver is older than Triton's bundled ptxas: point "
        "TRITON_PTXAS_BLACKWELL_PATH (sm_90+) or TRITON_PTXAS_PATH (older GPUs) at the machine's CUDA ptxas.",
        KernelFallbackWarning,
        stacklevel=4,
    )
    return False


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors runs the Triton kernels under the current backend."""
    name = get_backend()
    if name == "reference":
        return False
    if name == "auto":
        return triton_available() and all(_cuda_ok(t) for t in tensors) and _smoke_ok(tensors[0])
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
    "KernelFallbackWarning",
    "Route",
    "apm_merge",
    "check_kernels",
    "fallback_reason",
    "get_backend",
    "moe_combine",
    "moe_dispatch",
    "set_backend",
    "top1_route",
    "triton_available",
    "use_triton",
    "window_attention",
]
