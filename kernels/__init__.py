"""Triton kernels of mmfast, one module per op family.

Installed as ``mmfast.kernels`` (never as a top-level ``kernels``). A module serves an op by
defining ``<op>_forward(...)`` and ``<op>_backward(...)`` launchers whose signatures match the
implementation functions of the op's custom op pair in ``mmfast.ops``; the kernels know nothing
of models.
Importing this package does not import Triton; the op modules do.
"""
