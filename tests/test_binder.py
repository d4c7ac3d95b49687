"""binder/ agrees with pyproject.toml: every dependency is installed there, at
a version pyproject accepts, torch from the CPU index; and postBuild installs
the repo without letting pip resolve (and swap torch) again."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_UI = {"jupyterlab"}  # what binder adds to run the notebooks


def binder_requirements() -> tuple[dict[str, Requirement], list[str]]:
    requirements, options = {}, []
    for line in (REPO / "binder" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-"):
            options.append(line)
        elif line:
            requirement = Requirement(line)
            requirements[canonicalize_name(requirement.name)] = requirement
    return requirements, options


def test_binder_installs_every_dependency_at_a_version_pyproject_accepts():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]}
    pinned, _ = binder_requirements()
    assert set(wanted) - set(pinned) == set(), "dependencies missing from binder/requirements.txt"
    assert set(pinned) - set(wanted) - NOTEBOOK_UI == set(), "binder installs packages pyproject does not need"
    for name, requirement in wanted.items():
        (pin,) = pinned[name].specifier  # exactly one pin per package
        assert pin.operator == "==", f"{name} is not pinned in binder/requirements.txt"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"binder pins {name}=={pin.version}, which pyproject's {requirement} refuses"
        )


def test_binder_takes_torch_from_the_cpu_index_and_installs_the_repo_without_resolving():
    pinned, options = binder_requirements()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in options
    assert str(pinned["torch"].specifier).endswith("+cpu")
    post_build = REPO / "binder" / "postBuild"
    assert post_build.stat().st_mode & 0o111, "postBuild must be executable"
    assert "pip install --no-deps -e ." in post_build.read_text()
