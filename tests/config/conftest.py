"""Make ``import config`` find the real package under pytest.

With the default (prepend) import mode pytest puts ``tests/`` on sys.path for
tests/conftest.py, and ``tests/config/`` (no __init__.py) then shadows the
project's ``config`` package as an empty namespace package, while the editable
install's finder only resolves ``config.*`` submodules.  The proper fix is
``pythonpath = .`` under ``[tool:pytest]`` in setup.cfg (owned by the lead);
until then this puts the project root first and drops a namespace ``config``
that was imported too early.
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
_mod = sys.modules.get("config")
if _mod is not None and getattr(_mod, "__file__", None) is None:
    del sys.modules["config"]  # namespace stand-in; submodules stay cached
