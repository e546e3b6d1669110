"""``kernels/`` is ``blipfast.kernels`` and never the top-level ``kernels`` module, which
transformers imports as the Hub kernels library: with the repository root on
``sys.path`` (``python -m pytest`` or ``PYTHONPATH=.`` there) a plain ``import kernels``
must still give the installed library, or fail as if the folder were not there."""

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def _import_kernels(*search_path):
    """Runs ``import kernels`` in a fresh interpreter without site-packages whose path
    starts with ``search_path``; returns (exit status, output)."""
    script = ("import sys; sys.path[:0] = sys.argv[1:]\n"
              "import kernels\n"
              "print(kernels.__file__, getattr(kernels, 'HUB', None))\n")
    result = subprocess.run([sys.executable, "-S", "-c", script, *map(str, search_path)],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_repository_root_on_the_path_gives_the_installed_hub_kernels(tmp_path):
    hub = tmp_path / "kernels"
    hub.mkdir()
    (hub / "__init__.py").write_text("HUB = 'the Hub kernels library'\n")
    status, output = _import_kernels(REPOSITORY, tmp_path)
    assert status == 0, output
    assert str(hub / "__init__.py") in output and "the Hub kernels library" in output


def test_repository_root_on_the_path_without_hub_kernels_finds_no_kernels():
    status, output = _import_kernels(REPOSITORY)
    assert status != 0
    assert "ModuleNotFoundError" in output and "blipfast.kernels" in output


def test_transformers_blip_imports_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-c", "import transformers.models.blip.modeling_blip, blipfast.kernels"
         ".attention as attention; print(attention.__name__)"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "blipfast.kernels.attention"
