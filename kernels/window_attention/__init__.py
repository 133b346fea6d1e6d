"""SwinV2 window attention: `reference.py` (PyTorch), `kernel.py` (Triton), `function.py` (autograd).

Importing this package does not import Triton; `kernels.window_attention` (the attribute of `kernels`) is the
dispatching function, so reach the modules with `from kernels.window_attention import reference`.
"""
