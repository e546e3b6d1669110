"""``kernels/`` is ``blipfast.kernels`` and never the top-level ``kernels`` module, which
transformers imports as the Hub kernels library: with the repository root on
``sys.path`` (``python -m pytest`` or ``PYTHONPATH=.`` there) a plain ``import kernels``
must still give the installed library, or without one an empty stand-in that looks
uninstalled to transformers, and transformers' BLIP must import either way."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent


def _import_kernels(*search_path):
    """Runs ``import kernels`` in a fresh interpreter without site-packages whose path
    starts with ``search_path``; returns (exit status, output)."""
    script = ("import sys; sys.path[:0] = sys.argv[1:]\n"
              "import kernels\n"
              "print(getattr(kernels, '__file__', None), getattr(kernels, 'HUB', None),\n"
              "      getattr(kernels, '__version__', None))\n"
              "kernels.get_kernel\n")
    result = subprocess.run([sys.executable, "-S", "-c", script, *map(str, search_path)],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_repository_root_on_the_path_gives_the_installed_hub_kernels(tmp_path):
    hub = tmp_path / "kernels"
    hub.mkdir()
    (hub / "__init__.py").write_text("HUB = 'the Hub kernels library'\n"
                                      "def get_kernel(): pass\n")
    status, output = _import_kernels(REPOSITORY, tmp_path)
    assert status == 0, output
    assert str(hub / "__init__.py") in output and "the Hub kernels library" in output


def test_repository_root_on_the_path_without_hub_kernels_gives_an_uninstalled_stand_in():
    status, output = _import_kernels(REPOSITORY)
    assert status != 0
    assert "None None None" in output  # no __file__, no __version__: "not installed"
    assert "AttributeError" in output and "blipfast.kernels" in output


def _site_packages_without_hub_kernels(tmp_path) -> Path:
    """A folder of links to everything in this interpreter's site-packages except the Hub
    kernels library (as on a machine without it, transformers 5.17's)."""
    import site

    folder = tmp_path / "site-packages"
    folder.mkdir()
    distributions = set()  # a venv's own versions shadow the system site's (first found)
    for site_packages in map(Path, site.getsitepackages()):
        for entry in site_packages.iterdir() if site_packages.is_dir() else ():
            if entry.name.endswith((".dist-info", ".egg-info")):
                distribution = entry.name.split("-")[0].lower().replace(".", "_")
                if distribution in distributions:
                    continue
                distributions.add(distribution)
            hub = entry.name == "kernels" or entry.name.startswith("kernels-")
            if not hub and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.parametrize("site_packages", ["as_installed", "without_hub_kernels"])
def test_transformers_blip_imports_from_the_repository_root(tmp_path, site_packages):
    """With the repository root first on the path (``python -m pytest`` there), with this
    interpreter's site-packages as they are (CI's has the Hub kernels library) and with
    them less the Hub kernels library."""
    hub_kernels = site_packages == "as_installed"
    script = ("import sys, site\n"
              "if len(sys.argv) > 1: site.addsitedir(sys.argv[1])\n"
              "import transformers.models.blip.modeling_blip, blipfast.kernels.attention as a\n"
              "from transformers.utils.import_utils import is_kernels_available\n"
              "print(a.__name__, is_kernels_available())\n")
    command = [sys.executable, "-c", script] if hub_kernels else [
        sys.executable, "-S", "-c", script, str(_site_packages_without_hub_kernels(tmp_path))]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    name, available = result.stdout.split()
    assert name == "blipfast.kernels.attention"
    assert available == "False" or hub_kernels


def _can_build_wheels() -> bool:
    """setuptools 70.1 and later build wheels; older ones need the wheel package. The
    dev extra installs a new enough one; a machine set up without it (``--no-deps``)
    may have neither."""
    import importlib.util

    import setuptools

    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _build_wheel(tmp_path) -> Path:
    """Builds the wheel a user would install, from a copy of the sources (the editable
    install the tests run on maps the folders without packaging them)."""
    if not _can_build_wheels():
        pytest.skip("setuptools older than 70.1 without the wheel package cannot build a "
                    "wheel; the dev extra installs a newer one")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    for folder in ("blipfast", "kernels"):
        shutil.copytree(REPOSITORY / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(source), "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("blipfast-*.whl")
    return wheel


def test_the_wheel_installs_every_module_under_blipfast(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(name).decode() for name in names
                            if name.endswith(".dist-info/entry_points.txt"))
    expected = {f"blipfast/{path.relative_to(REPOSITORY / 'blipfast').as_posix()}"
                for path in (REPOSITORY / "blipfast").rglob("*.py")}
    expected |= {f"blipfast/kernels/{path.name}" for path in (REPOSITORY / "kernels").glob("*.py")}
    expected.add("blipfast/py.typed")  # PEP 561: type checkers read the annotations
    modules = {name for name in names if not name.startswith("blipfast-")}
    assert modules == expected, (f"missing: {sorted(expected - modules)}; "
                                 f"unexpected: {sorted(modules - expected)}")
    assert "blipfast-demo = blipfast.demo:main" in entry_points

    # Installed on its own (not the editable install), it imports from where it landed.
    target = tmp_path / "installed"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    script = ("import blipfast, blipfast.kernels.attention, blipfast.models, blipfast.train\n"
              "print(blipfast.__file__); print(blipfast.kernels.attention.__file__)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr[-2000:]
    for line in result.stdout.split():
        assert line.startswith(str(target)), result.stdout

    # A user's type checker reads the installed annotations (PEP 561: blipfast/py.typed):
    # code written against blipfast gets its wrong argument reported, and patch() hands
    # back the model's own type.
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    user_code = tmp_path / "user_code.py"
    user_code.write_text(
        "import torch\n"
        "import blipfast\n"
        "import blipfast.ops\n"
        "q = torch.randn(1, 4, 2, 32)\n"
        "out = blipfast.ops.attention(q, q, q, causal='yes')\n"
        "reveal_type(out)\n"
        "reveal_type(blipfast.patch(torch.nn.Linear(2, 2)))\n")
    (tmp_path / "mypy.ini").write_text("[mypy]\n")  # none of the repository's settings
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"),
         "--cache-dir", str(tmp_path / "mypy-cache"), str(user_code)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(target)})
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert ('user_code.py:5: error: Argument "causal" to "attention" has incompatible type '
            '"str"; expected "bool"') in report
    assert 'user_code.py:6: note: Revealed type is "torch._tensor.Tensor"' in report
    assert 'user_code.py:7: note: Revealed type is "torch.nn.modules.linear.Linear"' in report
    assert "Found 1 error in 1 file" in report, report


def _pyproject_lower_bounds() -> dict[str, str]:
    """{name: version} of each ``name>=version`` in pyproject.toml's dependencies, and
    ``python`` for requires-python (read without tomllib, which Python 3.10 lacks)."""
    text = (REPOSITORY / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    assert dependencies, "pyproject.toml has no dependencies list"
    bounds = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', dependencies.group(1)))
    python = re.search(r'^requires-python = ">=([0-9.]+)"', text, re.MULTILINE)
    assert python, "pyproject.toml has no requires-python lower bound"
    bounds["python"] = python.group(1)
    return bounds


def test_lower_bounds_are_the_oldest_tested_versions():
    """pyproject.toml's lower bounds are the pins of tests/oldest_versions.txt, the
    versions the suite passed with, and the README states them: a bound cannot move
    without the record of the run that supports it (or the other way round)."""
    constraints = (REPOSITORY / "tests" / "oldest_versions.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([0-9.]+)$", constraints, re.MULTILINE))
    bounds = _pyproject_lower_bounds()
    python = bounds.pop("python")
    assert f"python{python} -m venv" in constraints, "the constraints' Python is not the floor"
    for name, version in bounds.items():
        pin = pins.get(name, "")
        assert pin == version or pin.startswith(version + "."), (name, version, pin)
    assert set(pins) == set(bounds), (pins, bounds)
    readme = (REPOSITORY / "README.md").read_text()
    for name, version in [("Python", python), *bounds.items()]:
        assert f"{name} ≥ {version}" in readme, f"README does not state {name} ≥ {version}"
