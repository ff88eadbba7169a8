"""The package installs beside Hugging Face's ``kernels`` distribution without a clash.

The repository's ``kernels/`` folder is installed under the import name ``aligner_kernels``
(``package_dir`` in setup.py), because transformers itself imports a top-level ``kernels`` (the
Hub kernels package) when one is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STANDIN_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "kernels"
version = "0.0.1"

[tool.setuptools]
packages = ["kernels"]
"""


def _run(*command: str | Path, cwd: Path) -> str:
    # Without the caller's PYTHONPATH: a checkout on it would shadow what the venv installed.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_installs_and_imports_beside_a_distribution_named_kernels(tmp_path):
    # A stand-in for Hugging Face's `kernels` distribution: a top-level package named `kernels`.
    standin = tmp_path / "standin"
    (standin / "kernels").mkdir(parents=True)
    (standin / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return 'hub:' + name\n")
    (standin / "pyproject.toml").write_text(STANDIN_PYPROJECT)
    # Our sources, copied so that the build writes nothing into the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, source / name)
    for package in ("aligner", "kernels"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))

    # A fresh virtual environment. Its own site-packages comes first; the running environment's
    # follows through a .pth line so that torch and triton need not be installed again (its .pth
    # files, the editable install of this checkout among them, are not processed from there).
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
        "--no-build-isolation", "--no-index", source, standin, cwd=tmp_path,
    )  # fmt: skip

    probe = (
        "import kernels, aligner_kernels, aligner; "
        "print(kernels.get_kernel('x')); print(aligner_kernels.__file__); print(aligner.__file__); "
        "print(aligner_kernels.SUPPORTED_HEAD_DIMS)"
    )
    hub, ours, library, head_dims = _run(python, "-c", probe, cwd=tmp_path).splitlines()
    assert hub == "hub:x"
    assert Path(ours).is_relative_to(site) and Path(ours).parent.name == "aligner_kernels"
    assert Path(library).is_relative_to(site)
    assert head_dims.startswith("(16, 32, 64")
