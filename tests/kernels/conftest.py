"""Fixtures for the kernel tests: Triton's CPU interpreter, switched on per test (never for the whole session).

`TRITON_INTERPRET` is read when a `@triton.jit` function is *defined*, i.e. when `kernels/<op>/kernel.py` is first
imported. Nothing imports those modules but a Triton call, so setting the variable for the duration of a test (and
importing the kernel modules inside it) is enough, unless triton itself was first imported earlier in this process
without it (triton.language's own @jit helpers are then compiled-mode only): those tests skip, saying so. In the
suite's order the kernel tests come first. The rest of the suite never sees the variable.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels on CPU tensors through the interpreter for this test; yields a module loader."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def load(op: str):
        fn = importlib.import_module(f"kernels.{op}.function")
        kern = importlib.import_module(f"kernels.{op}.kernel")
        from triton.runtime.interpreter import InterpretedFunction

        jitted = [v for k, v in vars(kern).items() if k.endswith("_kernel")]
        if not all(isinstance(j, InterpretedFunction) for j in jitted):
            pytest.skip(f"kernels.{op}.kernel was imported without TRITON_INTERPRET=1 earlier in this process")
        import triton.language as tl

        # triton.language's own @jit helpers (tl.zeros, tl.sum, ...) are decided when triton is first imported:
        # imported earlier without the interpreter (DeepSpeed or torch import triton), the interpreter cannot call them
        if not isinstance(tl.zeros, InterpretedFunction):
            pytest.skip("triton was imported without TRITON_INTERPRET=1 earlier in this process (run tests/kernels "
                        "first, or alone)")
        return fn

    yield load


@pytest.fixture
def cuda_kernels():
    """Real CUDA kernels (gpu marker): skip without CUDA or when the interpreter already claimed the modules."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")

    def load(op: str):
        fn = importlib.import_module(f"kernels.{op}.function")
        kern = importlib.import_module(f"kernels.{op}.kernel")
        from triton.runtime.interpreter import InterpretedFunction

        if any(isinstance(v, InterpretedFunction) for v in vars(kern).values()):
            pytest.skip("kernels were loaded by the interpreter in this process; run `pytest -m gpu` separately")
        return fn

    return load
