"""Run timm's own model test suite (``tests/test_models.py`` of a timm checkout) on this project's models.

The test file is copied into a scratch folder with two edits, and nothing else changed: the model
modules are filed as timm files its ViTs (``irpe_deit``, ``spvit``, ``irpe_vit`` and ``irpe_swin``
in the ``forward_intermediates`` / features list, the ViT-like names in the non-standard list), and
``import finetune`` registers the models. Tests that need a network (pretrained downloads, Hub test
tensors) are deselected. Usage::

    python tools/timm_model_tests.py PATH/TO/pytorch-image-models [pytest arguments ...]

e.g. ``-x -k spvit_small`` to run one model; with no ``-k`` every model of this project is selected.
The timm checkout should match the installed timm version (a source distribution from PyPI has the
tests too: ``pip download timm==VERSION --no-binary :all: --no-deps``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

# timm's ``list_models(module=...)`` names: models with forward_intermediates and the getter features.
FEATURE_MODULES = ("irpe_deit", "spvit", "irpe_vit", "irpe_swin")
# Transformers whose features are tokens, filed beside timm's 'vit_*' and 'deit*' (the official
# iRPE-DeiT names start with 'deit', which timm's list already holds).
NON_STANDARD_NAMES = ("irpe_deit_*", "spvit_*", "irpe_vit*")
# Every model of this project: the official iRPE-DeiT names hold '_shared_'.
MODEL_SELECTION = "_shared_ or irpe_deit_ or spvit_ or irpe_vit or irpe_swin_"
# These need the network (pretrained weights, the Hub's test tensors).
NETWORK_TESTS = ("test_model_load_pretrained", "test_model_features_pretrained", "test_model_inference")

ANCHORS = {
    "FEAT_INTER_FILTERS = [": "".join(f" '{name}'," for name in FEATURE_MODULES),
    "NON_STD_FILTERS = [": "".join(f" '{name}'," for name in NON_STANDARD_NAMES),
}


def patched_test_models(source: str) -> str:
    """timm's test_models.py with this project's models registered and filed in its filter lists."""
    for anchor, entries in ANCHORS.items():
        if source.count(anchor) != 1:
            raise ValueError(f"test_models.py: expected one line starting {anchor!r}; is this timm's test file?")
        source = source.replace(anchor, anchor + entries)
    return "import finetune  # noqa: F401  (registers this project's models with timm)\n" + source


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: python tools/timm_model_tests.py TIMM_CHECKOUT [pytest arguments ...]", file=sys.stderr)
        return 2
    tests = Path(argv[0]) / "tests"
    test_file = tests / "test_models.py"
    if not test_file.is_file():
        print(f"error: {test_file}: no such file (expected a timm checkout with its tests/ folder)", file=sys.stderr)
        return 2
    try:
        patched = patched_test_models(test_file.read_text(encoding="utf-8"))
    except ValueError as err:
        print(f"error: {test_file}: {err}", file=sys.stderr)
        return 2
    pytest_args = argv[1:]
    if "-k" not in pytest_args:
        pytest_args += ["-k", f"({MODEL_SELECTION}) and not ({' or '.join(NETWORK_TESTS)})"]
    else:
        position = pytest_args.index("-k") + 1
        pytest_args[position] = f"({pytest_args[position]}) and not ({' or '.join(NETWORK_TESTS)})"
    with tempfile.TemporaryDirectory(prefix="timm-model-tests-") as scratch:
        (Path(scratch) / "test_models.py").write_text(patched, encoding="utf-8")
        if (tests / "conftest.py").is_file():
            shutil.copy(tests / "conftest.py", scratch)
        # this checkout's packages first (not another install of the project)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", scratch, "-c", os.devnull,
                   str(Path(scratch) / "test_models.py"), *pytest_args]
        return subprocess.call(command, cwd=scratch, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
