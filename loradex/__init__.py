"""loradex: a self-hosted hub for LoRA adapters (train, score, register, serve, promote and export).

The stages are the subpackages ``loradex.hub``, ``loradex.training``,
``loradex.evals``, ``loradex.serving`` and ``loradex.promote``. In a checkout
they are the top-level folders ``hub/``, ``training/`` ... beside this one
(this package's path is extended to the checkout's root, below); an installed
wheel maps them under ``loradex/`` (``[tool.setuptools.package-dir]``). Either
way they are imported only by their ``loradex.`` names, so nothing loradex
installs can collide with another distribution's top-level ``hub``, ``evals``
or ``training``.
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.2.0"

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
if not (_HERE / "hub").is_dir() and (_ROOT / "hub" / "__init__.py").is_file():
    # a checkout (or an image with the stage folders beside this one): loradex.hub is ../hub, ...
    __path__.append(str(_ROOT))
