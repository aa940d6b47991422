"""Thin setup.py: maps the repository's top-level kernels/ to mmfast.kernels.

The Triton sources live in kernels/ (DESIGN.md) but must ship inside the mmfast
distribution: a top-level module called `kernels` belongs to another package on the index.
"""
from setuptools import find_packages, setup

packages = ["mmfast"] + [f"mmfast.{p}" for p in find_packages("mmfast")]
packages += ["mmfast.kernels"] + [f"mmfast.kernels.{p}" for p in find_packages("kernels")]

setup(packages=packages, package_dir={"mmfast": "mmfast", "mmfast.kernels": "kernels"})
