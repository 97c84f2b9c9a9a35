"""One import namespace, an installable wheel with nothing but padst_compiler in it,
and the console script."""

import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from padst_compiler.misplaced import installed_elsewhere

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["kernels", "passes", "training", "integrations"])
def test_root_folders_cannot_be_used_under_a_second_name(folder):
    """From the repository root ``import kernels`` finds the folder: a stand-in with no file or
    version (what a package probe reads as "not installed") that refuses any use, or, where
    a package of that name is installed, that package."""
    if installed_elsewhere(folder) is not None:
        code = f"import {folder}, pathlib; print(pathlib.Path({folder}.__file__).resolve())"
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        assert Path(result.stdout.strip()).parent != ROOT / folder
        return
    code = (f"import {folder}; assert getattr({folder}, '__file__', None) is None; "
            f"assert getattr({folder}, '__version__', 'N/A') == 'N/A'; {folder}.anything")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"ImportError: this package must be imported as padst_compiler.{folder}" in result.stderr


def test_an_installed_package_named_like_a_root_folder_is_what_the_root_imports(tmp_path):
    """The root folder must not hide a package of the same name that is installed: its
    import, and its own imports of its submodules, give that package."""
    package = tmp_path / "passes"
    package.mkdir()
    (package / "__init__.py").write_text("from passes.part import VALUE\n")
    (package / "part.py").write_text("VALUE = 'installed'\n")
    code = "import passes; print(passes.VALUE)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.stdout.strip() == "installed"


def test_transformers_imports_its_trainer_from_the_repository_root():
    """transformers imports a ``kernels`` package it finds on sys.path (the Hub's kernels);
    the root folder of that name used to make ``from transformers import Trainer`` fail."""
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-c", "from transformers import Trainer"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_subpackages_resolve_to_the_root_folders():
    import padst_compiler.kernels  # noqa: F401  (imported for sys.modules)
    import padst_compiler.passes  # noqa: F401
    import padst_compiler.training  # noqa: F401
    import padst_compiler.integrations  # noqa: F401

    folders = ["kernels", "passes", "training", "integrations"]
    for folder in folders:
        module = sys.modules[f"padst_compiler.{folder}"]
        assert Path(module.__file__).resolve().parent == ROOT / folder
    for folder in folders:  # under a top-level name only an installed package of that name
        module = sys.modules.get(folder)
        assert module is None or Path(module.__file__).resolve().parent != ROOT / folder


def test_wheel_holds_only_the_padst_compiler_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("padst_compiler-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"padst_compiler"}
    for module in ("kernels/ops/registry.py", "kernels/structures.py", "kernels/cpu/native.cpp", "passes/__init__.py",
                   "training/__init__.py", "integrations/huggingface.py", "peers_deepsparse.py"):  # native.cpp: the source the CPU kernels are built from
        assert f"padst_compiler/{module}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "padst = padst_compiler.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_console_script_is_installed():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("padst") == "padst_compiler.cli:main"
    padst = Path(sys.executable).parent / "padst"
    result = subprocess.run([str(padst), "demo", "--help"], capture_output=True, text=True, check=True)
    assert "--sparsity" in result.stdout


def test_the_kernels_and_the_training_package_import_without_the_compiler():
    """Dependencies point one way: kernels <- training <- compiler (passes, backend, api)."""
    code = ("import sys, padst_compiler.training\n"
            "compiler = {'padst_compiler.api', 'padst_compiler.backend', 'padst_compiler.pipeline'}\n"
            "loaded = sorted(m for m in sys.modules if m in compiler or m.startswith('padst_compiler.passes'))\n"
            "assert not loaded, loaded\n"
            "import padst_compiler\n"
            "assert padst_compiler.optimize.__module__ == 'padst_compiler.api'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
