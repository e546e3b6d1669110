"""The public API's surface: annotations, docstrings and the README. blipfast ships
``py.typed``, so its annotations are what a user's type checker reads: every public
function and public method of a public class is annotated in full and documented, every
public name appears in the README, and the package (``blipfast/`` and ``kernels/``) passes
mypy under the project's configuration (``[tool.mypy]`` in pyproject.toml). That the
installed wheel's annotations reach a user's mypy is checked where the wheel is built
(test_packaging)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import blipfast
import blipfast.distributed
import blipfast.models
import blipfast.ops
import blipfast.reference
import blipfast.train

REPOSITORY = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = (blipfast, blipfast.ops, blipfast.models, blipfast.train, blipfast.distributed)


def _public_names(module: ModuleType) -> list[str]:
    return list(module.__all__)


def _functions_defined_in(module: ModuleType) -> list[str]:
    return [name for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__
            and not name.startswith("_")]


def test_every_public_module_has_an_all_and_reference_lists_its_functions():
    for module in (*PUBLIC_MODULES, blipfast.reference):
        assert isinstance(getattr(module, "__all__", None), list), module.__name__
        assert all(hasattr(module, name) for name in module.__all__), module.__name__
    # blipfast.reference: exactly the public functions defined there (a new reference
    # must be added to __all__), importable with a star import
    assert sorted(blipfast.reference.__all__) == sorted(_functions_defined_in(blipfast.reference))
    namespace: dict = {}
    exec("from blipfast.reference import *", namespace)
    assert {"attention", "contrastive_loss_with_queue", "layer_norm"} <= set(namespace)
    assert "_compute_dtype" not in namespace and "torch" not in namespace


@pytest.mark.parametrize("function, parameters", [
    ("blipfast.ops.contrastive_loss_with_queue", ["label_smoothing", "alpha"]),
    ("blipfast.ops.add_layer_norm", ["eps"]),
    ("blipfast.train.FeatureQueue", ["size", "dim", "generator"]),
    ("blipfast.models.recompute_projection_outputs", ["enabled"]),
    ("blipfast.models.BlipTextModel", ["config", "add_pooling_layer"]),
    ("blipfast.models.BlipVisionModel", ["config"]),
    ("blipfast.models.BlipForImageTextRetrieval", ["config"]),
    ("blipfast.models.BlipForQuestionAnswering", ["config"]),
    ("blipfast.reference.contrastive_loss_with_queue", ["upcast", "label_smoothing"]),
    ("blipfast.reference.score_matrix_cross_entropy", ["upcast", "label_smoothing"]),
    ("blipfast.models.BlipTextLMHeadModel.forward", ["return_logits", "logits_to_keep"]),
    ("blipfast.models.BlipVisionModel.forward", ["interpolate_pos_encoding"]),
    ("blipfast.models.BlipForConditionalGeneration.forward",
     ["interpolate_pos_encoding", "logits_to_keep"]),
    ("blipfast.models.BlipForConditionalGeneration.generate", ["interpolate_pos_encoding"]),
    ("blipfast.models.BlipForImageTextRetrieval.forward", ["interpolate_pos_encoding"]),
    ("blipfast.models.BlipForQuestionAnswering.forward", ["interpolate_pos_encoding"]),
    ("blipfast.models.BlipForQuestionAnswering.generate", ["interpolate_pos_encoding"]),
])
def test_docstrings_name_these_parameters(function, parameters):
    """Parameters docstrings used to leave out (a class documents its constructor)."""
    value: object = blipfast
    for part in function.split(".")[1:]:
        value = getattr(value, part)
    documented = inspect.getdoc(value) or ""
    assert all(name in inspect.signature(value).parameters for name in parameters)
    missing = [name for name in parameters if not re.search(rf"(?<!\w){name}(?!\w)", documented)]
    assert not missing, f"{function}'s docstring does not mention {missing}"


def test_gather_docstrings_show_sizes_as_keyword_only():
    for function in (blipfast.distributed.gather_with_grad, blipfast.distributed.gather_no_grad):
        assert inspect.signature(function).parameters["sizes"].kind is \
            inspect.Parameter.KEYWORD_ONLY
        assert f"{function.__name__}(tensor, group=None, *, sizes=None)" in function.__doc__


def _unannotated(function) -> list[str]:
    """Parameters (all but self/cls) and the return value that carry no annotation."""
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    if parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    missing = [parameter.name for parameter in parameters
               if parameter.annotation is inspect.Parameter.empty]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def _public_callables():
    for module in (*PUBLIC_MODULES, blipfast.reference):
        for name in _public_names(module):
            value = getattr(module, name)
            if inspect.isfunction(value):
                yield f"{module.__name__}.{name}", value
            elif inspect.isclass(value):
                # The methods the class defines itself (inherited ones are transformers' or
                # torch's): public ones and __init__.
                for attribute, member in vars(value).items():
                    if attribute.startswith("_") and attribute != "__init__":
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if inspect.isfunction(member):
                        yield f"{module.__name__}.{name}.{attribute}", member


def test_public_functions_and_methods_are_fully_annotated():
    found = dict(_public_callables())
    # The walk reaches what it should: functions, methods and classmethods of each module.
    for expected in ("blipfast.patch", "blipfast.ops.attention", "blipfast.reference.attention",
                     "blipfast.distributed.gather_with_grad",
                     "blipfast.train.FeatureQueue.enqueue",
                     "blipfast.models.BlipPreTrainedModel.from_salesforce",
                     "blipfast.models.BlipForConditionalGeneration.generate"):
        assert expected in found, expected
    problems = {name: missing for name, function in found.items()
                if (missing := _unannotated(function))}
    assert not problems, f"unannotated parameters or return values: {problems}"


def test_public_functions_methods_and_classes_have_docstrings():
    """Documented where a user looks: each public function and method (``__init__`` is
    documented by its class), and each public class."""
    undocumented = [name for name, function in _public_callables()
                    if not name.endswith(".__init__") and not (function.__doc__ or "").strip()]
    undocumented += [f"{module.__name__}.{name}" for module in PUBLIC_MODULES
                     for name in _public_names(module)
                     if inspect.isclass(getattr(module, name))
                     and not (getattr(module, name).__doc__ or "").strip()]
    assert not undocumented, f"no docstring: {undocumented}"


def test_every_public_name_is_in_the_readme():
    readme = (REPOSITORY / "README.md").read_text()
    absent = [f"{module.__name__}.{name}" for module in PUBLIC_MODULES
              for name in _public_names(module)
              if name != "__version__" and not re.search(rf"(?<!\w){name}(?!\w)", readme)]
    assert not absent, f"public names the README does not mention: {absent}"


def test_the_check_reports_a_missing_annotation():
    def partly_annotated(self, x: int, y, **options) -> None:
        pass

    def no_return(x: int):
        pass

    assert _unannotated(partly_annotated) == ["y", "options"]
    assert _unannotated(no_return) == ["return"]


def test_the_package_passes_mypy(tmp_path):
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=600,
        env={key: value for key, value in os.environ.items() if key != "MYPYPATH"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # The configuration's file list: both source folders were checked.
    assert "Success: no issues found in" in result.stdout
    checked = int(result.stdout.split("Success: no issues found in ")[1].split()[0])
    assert checked == len(list((REPOSITORY / "blipfast").rglob("*.py"))) + \
        len(list((REPOSITORY / "kernels").glob("*.py"))), result.stdout


def test_submodules_are_reachable_from_the_package():
    """``import blipfast`` then ``blipfast.models.X`` (as the package docstring lists them)
    works without importing the submodules by name, and ``import blipfast`` alone imports
    neither the models nor the training step (the ops use ``blipfast.distributed``). Run in a fresh interpreter, where no test has
    imported them already."""
    script = (
        "import sys, blipfast\n"
        "loaded = [name for name in ('blipfast.models', 'blipfast.train') "
        "if name in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert {'models', 'train', 'ops'} <= set(dir(blipfast))\n"
        "assert blipfast.models.BlipForConditionalGeneration.__name__ == "
        "'BlipForConditionalGeneration'\n"
        "assert callable(blipfast.train.ramped_alpha) and blipfast.distributed.__name__\n"
        "try:\n"
        "    blipfast.no_such_submodule\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_submodule' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=300)
    assert result.returncode == 0, result.stderr


def test_exported_programs_with_the_kernels_load_after_import_blipfast(tmp_path):
    """A program exported with the kernels' custom ops in its graph (``torch.export.save``)
    loads and runs in a fresh process after ``import blipfast``: the ops are registered on
    import. They were registered at their first call, so loading failed ("failed to
    resolve torch.ops.blipfast.layer_norm_forward.default")."""
    path = tmp_path / "program.pt2"
    setup = (
        "import torch, blipfast\n"
        "class Block(torch.nn.Module):\n"
        "    def forward(self, q, x, weight):\n"
        "        return (blipfast.ops.attention(q, q, q, causal=True).sum()\n"
        "                + blipfast.ops.layer_norm(x, weight, None).sum())\n"
        "generator = torch.Generator().manual_seed(5)\n"
        "inputs = (torch.randn(2, 5, 2, 16, generator=generator),\n"
        "          torch.randn(3, 32, generator=generator), torch.randn(32, generator=generator))\n")
    export = setup + (
        "program = torch.export.export(Block(), inputs)\n"
        "names = {str(node.target) for node in program.graph.nodes}\n"
        "assert {'blipfast.attention_forward.default',\n"
        "        'blipfast.layer_norm_forward.default'} <= names, names\n"
        f"torch.export.save(program, {str(path)!r})\n")
    load = setup + (
        f"program = torch.export.load({str(path)!r})\n"
        "torch.testing.assert_close(program.module()(*inputs), Block()(*inputs))\n")
    environment = {**os.environ, "TRITON_INTERPRET": "1"}  # the kernels' ops in the graph
    for script in (export, load):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                env=environment, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
