"""Triton kernels and their launchers, importable as ``blipfast.kernels``.

One file per op; each holds its kernels, launchers and autograd wiring, and knows
nothing of models. Argument checking lives in ``blipfast.ops``.
"""
