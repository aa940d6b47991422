"""Triton kernels of mmfast, one module per op family.

Installed as ``mmfast.kernels`` (never as a top-level ``kernels``). Each op module exposes
``forward(...)`` and ``backward(...)`` launchers whose signatures match the implementation
functions of the corresponding custom op in ``mmfast.ops``; the kernels know nothing of models.
Importing this package does not import Triton; the op modules do.
"""
