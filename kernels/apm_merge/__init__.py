"""APM merging (2x2 gather + LayerNorm(4C)): `reference.py` (PyTorch), `kernel.py` (Triton), `function.py` (autograd).

Importing this package does not import Triton; `kernels.apm_merge` (the attribute of `kernels`) is the dispatching
function, so reach the modules with `from kernels.apm_merge import reference`.
"""
