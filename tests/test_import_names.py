"""No top-level import name of this repository shadows an installed distribution (CPU, no device).

transformers >= 5.25 asks `importlib.util.find_spec("kernels")` and, when the installed `kernels`
distribution's version fits, imports it. From the repository root (`python -m ...`, `python -m pytest`), the
root is sys.path[0], so any regular package or module there named like an installed distribution wins over
site-packages. The check runs find_spec in a child whose working directory is the root, as such a run would.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import REPO

_FIND_SPECS = """
import importlib.util, json, sys
out = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    places = list(spec.submodule_search_locations or []) if spec else []
    if spec and spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        places.append(spec.origin)
    out[name] = places
print(json.dumps(out))
"""


def top_level_names(root: Path) -> list[str]:
    """Every name `import X` could find at `root`: folders and .py files whose names are identifiers."""
    names = {p.stem if p.suffix == ".py" else p.name for p in root.iterdir()
             if (p.is_dir() or p.suffix == ".py") and not p.name.startswith((".", "_"))}
    return sorted(n for n in names if n.isidentifier())


def _in_checkout(path: Path, root: Path) -> bool:
    path = path.resolve()
    return path.is_relative_to(root.resolve()) and not path.is_relative_to(Path(sys.prefix).resolve())


def shadowed_names(root: Path, ours: str = "minispin") -> dict[str, str]:
    """{name: where find_spec found it} for each top-level name at `root` that an installed distribution other
    than `ours` provides but that resolves, from `root`, to a file or folder inside `root`."""
    installed = {name: dists for name, dists in importlib.metadata.packages_distributions().items()
                 if any(d.lower() != ours for d in dists)}
    names = [n for n in top_level_names(root) if n in installed]
    if not names:
        return {}
    found = json.loads(subprocess.run([sys.executable, "-c", _FIND_SPECS, *names], cwd=root, check=True,
                                      capture_output=True, text=True).stdout)
    inside = {}
    for name, places in found.items():  # the checkout's own files: inside root, outside the (.venv) install
        local = [p for p in places if _in_checkout(Path(p), root)]
        if local:
            inside[name] = local[0]
    return inside


def test_no_top_level_name_of_the_checkout_shadows_an_installed_distribution():
    assert "kernels" in top_level_names(REPO) and "minispin" in top_level_names(REPO)
    assert shadowed_names(REPO) == {}


def test_the_kernels_distribution_that_transformers_needs_is_the_one_imported_from_the_root():
    pytest.importorskip("transformers")  # [test] installs it; transformers >= 5.25 requires `kernels`
    if "kernels" not in importlib.metadata.packages_distributions():
        pytest.skip("no `kernels` distribution installed (transformers < 5.25)")
    probe = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)\n"
                            "from transformers import LlamaForCausalLM"], cwd=REPO, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert not _in_checkout(Path(probe.stdout.strip()), REPO), probe.stdout


def test_the_check_catches_a_regular_package_named_like_an_installed_distribution(tmp_path):
    # pytest is installed in every test run: a checkout with a pytest/__init__.py would shadow it
    (tmp_path / "pytest").mkdir()
    (tmp_path / "pytest" / "__init__.py").write_text("")
    (tmp_path / "kernels").mkdir()  # a folder without __init__.py: loses to any installed `kernels`
    (tmp_path / "kernels" / "linear_logprobs.py").write_text("")
    shadowed = shadowed_names(tmp_path)
    assert list(shadowed) == ["pytest"] and Path(shadowed["pytest"]) == tmp_path / "pytest"


def test_minispin_kernels_keeps_its_api():
    from minispin.kernels import linear_logprobs, linear_logprobs_reference, sequence_logps, sequence_logps_reference
    from minispin.kernels.interpreter import interpreter_clash  # noqa: F401  (a submodule, from kernels/)
    assert callable(linear_logprobs) and callable(sequence_logps)
    assert callable(linear_logprobs_reference) and callable(sequence_logps_reference)
    assert not (REPO / "kernels" / "__init__.py").exists()
