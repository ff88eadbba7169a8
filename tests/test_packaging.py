"""The package installs beside Hugging Face's ``kernels`` distribution without a clash; generate, chat
and info never import the training stack; the package's imports have no cycle and take no module's
private names.

The repository's ``kernels/`` folder is installed under the import name ``aligner_kernels``
(``package_dir`` in setup.py), because transformers itself imports a top-level ``kernels`` (the
Hub kernels package) when one is installed.
"""

from __future__ import annotations

import json
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


# --------------------------------------------------------------------------------------------
# What a command imports (issue 22: import what a command needs, when it needs it)

# The training stack. accelerate is not in the list: transformers itself imports it, where it is
# installed, as soon as a config or model loads (transformers.integrations.accelerate).
TRAINING_STACK = (
    "aligner.training",
    "transformers.trainer",
    "trl",
    "peft",
    "datasets",
    "matplotlib",
    "lm_eval",
    "bitsandbytes",
)

# Runs one command line in a fresh interpreter; its last stdout line lists every module then loaded.
PROBE = """
import json, sys
import aligner.cli
code = aligner.cli.main(sys.argv[1:])
print("modules:", json.dumps(sorted(sys.modules)))
sys.exit(code)
"""


def _command_modules(*argv: str | Path, cwd: Path, stdin: str = "") -> tuple[str, set[str]]:
    """(stdout before the module list, the modules loaded) of ``aligner ARGV`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, argv)],
        cwd=cwd, input=stdin, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    output, _, modules = result.stdout.rpartition("modules: ")
    return output, set(json.loads(modules))


def test_generate_chat_and_info_never_import_the_training_stack(tmp_path):
    from tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Name a colour", "input": "one word"}\n{"prompt": "hi"}\n')
    runs = {
        "generate": (["generate", model, "--prompt", "hello", "--data", prompts, "--max-new-tokens", "2",
                      "--no-progress", "--json"], ""),
        "chat": (["chat", model, "--max-new-tokens", "2", "--system", "Be brief.", "--json"],
                 "hi\n/reset\nagain\n"),
        "info": (["info", model, "--json"], ""),
    }  # fmt: skip
    for command, (argv, stdin) in runs.items():
        output, modules = _command_modules(*argv, cwd=tmp_path, stdin=stdin)
        loaded = [name for name in TRAINING_STACK if name in modules]
        assert loaded == [], (command, loaded)
        assert "aligner.cli.train" in modules  # the parser knows every command, without its imports
        lines = output.splitlines()
        if command == "generate":
            rows = [json.loads(line) for line in lines]
            assert [row["prompt"] for row in rows] == ["hello", "Name a colour\n\none word", "hi"]
        elif command == "chat":  # a reply to each of the two messages
            assert [json.loads(line)["prompt"] for line in lines] == ["hi", "again"]
        else:
            assert json.loads(lines[0])["model_type"] == "llama"


def test_the_inference_helpers_have_one_definition():
    """Loading and generation live outside aligner.training, which still exports them by their old names."""
    import aligner.generation
    import aligner.models
    import aligner.prompts
    import aligner.training
    import aligner.training.data

    assert aligner.training.load_model is aligner.models.load_model
    assert aligner.training.generate is aligner.generation.generate
    assert aligner.training.ModelLoadError is aligner.models.ModelLoadError
    assert aligner.training.prompt_examples is aligner.prompts.prompt_examples
    assert aligner.training.DataError is aligner.prompts.DataError
    assert aligner.training.data.format_prompt is aligner.prompts.format_prompt
