"""The wheel installs one top-level package, loradex, and lists every package folder of the checkout."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("hub", "training", "evals", "serving", "promote")


def test_every_package_folder_is_in_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {"loradex"}
    for stage in STAGES:
        for init in (ROOT / stage).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found.add("loradex." + ".".join(rel.parts))
    assert found == listed, f"pyproject.toml [tool.setuptools] packages: missing {found - listed}, extra {listed - found}"
    assert all(cfg["package-dir"][f"loradex.{s}"] == s for s in STAGES)


def test_stages_import_only_by_their_loradex_names():
    """A module imported as both `hub.x` and `loradex.hub.x` would be two modules (two exception classes)."""
    bad = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or path.parts[len(ROOT.parts)] in ("build", "dist"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            for stage in STAGES:
                if s.startswith((f"from {stage}.", f"from {stage} import", f"import {stage}.", f"import {stage} ")):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {s}")
    assert not bad, "\n".join(bad)
