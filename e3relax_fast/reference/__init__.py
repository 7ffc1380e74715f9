"""Pure-PyTorch reference twins of every kernel op: the oracle the kernels are tested against.

Each module here has the same name and arguments as its kernel in ``kernels/`` and ``csrc/``,
and is written for clarity, in float64 where exactness matters.
"""
