"""Triton kernels and their launchers, importable as ``blipfast.kernels``.

One file per op; each holds its kernels, launchers and autograd wiring, and knows
nothing of models. Argument checking lives in ``blipfast.ops``.

This folder sits at the top of the repository, so with the repository root on
``sys.path`` (``python -m ...`` or ``PYTHONPATH=.`` there) a plain ``import kernels``
would find it instead of the Hub kernels library that transformers imports under that
name. Imported that way, this module hands the name over to the installed library (or
raises ImportError as if this folder were not there); it never serves as ``kernels``.
"""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import sys as _sys
    from pathlib import Path as _Path

    def _installed_hub_kernels():
        repository = _Path(__file__).resolve().parent.parent
        search_path = [entry for entry in _sys.path
                       if _Path(entry or ".").resolve() != repository]
        spec = _machinery.PathFinder.find_spec("kernels", search_path)
        if spec is None:
            raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ "
                                      "folder is blipfast.kernels, not the Hub kernels library)",
                                      name="kernels")
        module = _util.module_from_spec(spec)
        _sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            _sys.modules.pop("kernels", None)
            raise
        return module

    _installed_hub_kernels()
