"""The repo's scripts (files beside the configs, not modules of a package), loaded as modules by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_script(relative: str, name: str) -> ModuleType:
    """The script at `relative` (to the repo) as module `name`, registered in sys.modules (its dataclasses
    look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dev_identity() -> ModuleType:
    """deploy/local/dev_identity.py: what `make up` and `RUN_AUTH=on make run` run."""
    return load_script("deploy/local/dev_identity.py", "dev_identity")
