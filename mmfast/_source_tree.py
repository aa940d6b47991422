"""Make ``mmfast.kernels`` importable from a source checkout.

An installed mmfast has the Triton sources at ``mmfast/kernels`` (setup.py maps the
repository's top-level ``kernels/`` there). When mmfast is imported straight from a checkout
(``python -m mmfast`` in the repository root, or an editable install), ``kernels/`` sits beside
``mmfast/`` instead; this registers it under its installed name so imports are the same.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def register_source_kernels(package_dir: str) -> None:
    if "mmfast.kernels" in sys.modules:
        return
    if os.path.isdir(os.path.join(package_dir, "kernels")):
        return  # installed layout: the normal import machinery finds it
    candidate = os.path.join(os.path.dirname(package_dir), "kernels", "__init__.py")
    if not os.path.isfile(candidate):
        return
    spec = importlib.util.spec_from_file_location(
        "mmfast.kernels", candidate, submodule_search_locations=[os.path.dirname(candidate)]
    )
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["mmfast.kernels"] = module
    spec.loader.exec_module(module)
