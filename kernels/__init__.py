"""Triton kernels and their launchers, importable as ``blipfast.kernels``.

One file per op; each holds its kernels, launchers and autograd wiring, and knows
nothing of models. Argument checking lives in ``blipfast.ops``.

This folder sits at the top of the repository, so with the repository root on
``sys.path`` (``python -m ...`` or ``PYTHONPATH=.`` there) a plain ``import kernels``
would find it instead of the Hub kernels library that transformers imports under that
name. Imported that way, this module hands the name over to the installed library; its
own contents are never served as ``kernels``. Without an installed library it stays an
empty stand-in that looks uninstalled: no ``__file__``, no ``__version__``, and any other
attribute raises AttributeError naming ``blipfast.kernels``. (Raising ImportError instead would be
truer, but transformers 5.17, finding a ``kernels`` folder on the path, imports it to
read a version without catching the error, so its BLIP failed to import; a module
without ``__file__`` or ``__version__`` is what it takes for a namespace package, "not
installed".)
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
        if spec is None or spec.loader is None:
            return None
        module = _util.module_from_spec(spec)
        _sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            _sys.modules.pop("kernels", None)
            raise
        return module

    if _installed_hub_kernels() is None:
        for _name in ("__file__", "_installed_hub_kernels", "_machinery", "_util", "_sys",
                      "_Path"):
            del globals()[_name]
        del _name

        def __getattr__(name):
            raise AttributeError(
                f"module 'kernels' has no attribute {name!r}: the Hub kernels library is not "
                "installed, and the repository's kernels/ folder found on sys.path is "
                "blipfast.kernels (import it under that name)")
