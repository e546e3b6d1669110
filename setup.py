"""Packaging: ``kernels/`` installs as ``blipfast.kernels`` (never as a top-level
``kernels`` module, which transformers would mistake for the Hub kernels library)."""

from setuptools import setup

setup(
    packages=["blipfast", "blipfast.ops", "blipfast.kernels", "blipfast.models",
              "blipfast.models.blip", "blipfast.train"],
    package_dir={"blipfast": "blipfast", "blipfast.kernels": "kernels"},
    package_data={"blipfast": ["py.typed"]},  # PEP 561: the annotations are for type checkers
)
