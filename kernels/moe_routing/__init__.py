"""Top-1 routing, dispatch and combine: `reference.py` (PyTorch), `kernel.py` (Triton), `function.py` (autograd).

Importing this package does not import Triton.
"""
