"""The dependency picture, read off the source with `ast`: layered packages, no module reaching
into another's private names, and sam_jax free of torch, experiments and tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_TREES = ("sam_jax", "experiments", "checkpoints_convert", "tests")

# Lowest first. A module may import any module of a lower layer, and within its own layer
# only modules of its own group (the predictor does not import the generator, evaluation
# does not import the predictors). `sam_jax/__init__.py` re-exports and sits on top.
LAYERS = [
    ("base", ["sam_jax.configs", "sam_jax.errors", "sam_jax.tree_paths", "sam_jax.metrics", "sam_jax.host",
              "sam_jax.image_io", "sam_jax.folder_runner", "sam_jax.staging", "sam_jax.utils", "sam_jax.data"]),
    ("model", ["sam_jax.modeling"]),
    ("core", ["sam_jax.prompts", "sam_jax.weights"]),
    ("text encoder", ["sam_jax.clip"]),
    ("front ends", ["sam_jax.predictor", "sam_jax.batch_predictor", "sam_jax.automatic_mask_generator",
                    "sam_jax.evaluation", "sam_jax.data_engine"]),
    ("training", ["sam_jax.training"]),
    ("deployment", ["sam_jax.serve", "sam_jax.export"]),
    ("command line", ["sam_jax.cli", "sam_jax"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(*trees: str) -> list[Path]:
    return sorted(p for tree in trees for p in (ROOT / tree).rglob("*.py") if "stand_ins" not in p.parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) of every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


def group_of(module: str) -> tuple[int, str]:
    """(layer index, group) of a sam_jax module: the longest group prefix that contains it."""
    best = None
    for rank, (_, groups) in enumerate(LAYERS):
        for group in groups:
            if (module == group or module.startswith(group + ".")) and (best is None or len(group) > len(best[1])):
                best = (rank, group)
    assert best is not None, f"{module} is in no layer of test_layout.LAYERS: place it there"
    return best


def private_imports(path: Path, here: str) -> list[str]:
    """Imports in `path` (module `here`) of another module's `_private` names."""
    found = []
    for line, module, names in imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and module != here:
            found.append(f"{path.name}:{line} from {module} import {', '.join(private)}")
    return found


def layer_violations(path: Path, here: str) -> list[str]:
    """Imports in `path` (sam_jax module `here`) of a higher layer, or of another group of its own."""
    rank, group = group_of(here)
    found = []
    for line, module, _ in imports(path):
        if not module.startswith("sam_jax.") or here == "sam_jax":
            continue
        other_rank, other_group = group_of(module)
        if other_rank > rank or (other_rank == rank and other_group != group):
            found.append(f"{path.name}:{line} ({LAYERS[rank][0]}: {group}) imports {module} "
                         f"({LAYERS[other_rank][0]}: {other_group})")
    return found


def test_no_module_imports_another_modules_private_names():
    found = [v for path in source_files(*SOURCE_TREES) for v in private_imports(path, module_name(path))]
    assert not found, "\n".join(found)


def test_sam_jax_is_layered():
    found = [v for path in source_files("sam_jax") for v in layer_violations(path, module_name(path))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("forbidden", ["torch", "segment_anything", "experiments", "tests", "conftest"])
def test_sam_jax_never_imports(forbidden):
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in source_files("sam_jax") for line, module, _ in imports(path)
             if module == forbidden or module.startswith(forbidden + ".")]
    assert not found, "\n".join(found)


def test_only_the_command_line_reaches_the_converter():
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in source_files("sam_jax") for line, module, _ in imports(path)
             if module.startswith("checkpoints_convert") and group_of(module_name(path))[1] != "sam_jax.cli"]
    assert not found, "\n".join(found)


def test_the_checks_catch_violations(tmp_path):
    """A stand-in evaluation module that imports training, a predictor and a private name."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy as np\nfrom sam_jax.training.losses import sam_loss\n"
                   "from sam_jax.predictor import _private, SamPredictor\nfrom sam_jax.modeling import Sam\n"
                   "from sam_jax.evaluation.clicks import next_click\n")
    here = "sam_jax.evaluation.bad"
    assert private_imports(bad, here) == ["bad.py:3 from sam_jax.predictor import _private"]
    assert [v.split(" imports ")[1].split()[0] for v in layer_violations(bad, here)] == [
        "sam_jax.training.losses", "sam_jax.predictor"]
    assert layer_violations(bad, "sam_jax.training.bad") == [], "training may import evaluation and front ends"
