"""The version ranges are stated once in substance: pyproject.toml, _compat.TESTED_RANGES and .ci/floors.txt agree."""

from __future__ import annotations

import sys
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from anomalib_mvfa._compat import TESTED_RANGES

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def project() -> dict:
    """The ``[project]`` table of pyproject.toml."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]


def dependencies() -> dict[str, Requirement]:
    """The package's own dependencies by canonical name."""
    requirements = (Requirement(line) for line in project()["dependencies"])
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def floors() -> dict[str, Version]:
    """The pins of .ci/floors.txt (``name==version`` lines; ``#`` starts a comment) by canonical name."""
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            requirement = Requirement(text)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{text!r} in .ci/floors.txt is not a pin"
            pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def lower_bound(specifiers: SpecifierSet) -> Version | None:
    """The version of the ``>=`` clause of ``specifiers``, if it has one."""
    bounds = [Version(spec.version) for spec in specifiers if spec.operator == ">="]
    return max(bounds) if bounds else None


@pytest.mark.parametrize("library", sorted(TESTED_RANGES))
def test_tested_range_is_the_dependency_range(library: str) -> None:
    requirement = dependencies().get(canonicalize_name(library))
    assert requirement is not None, f"{library} of TESTED_RANGES is not a dependency in pyproject.toml"
    assert requirement.specifier == SpecifierSet(TESTED_RANGES[library]), (
        f"pyproject.toml says {requirement}, _compat.TESTED_RANGES says {library}{TESTED_RANGES[library]}"
    )
    upper = [spec for spec in requirement.specifier if spec.operator == "<"]
    assert upper, f"{requirement} has no upper bound, though _compat.py relies on {library}'s internals"


@pytest.mark.parametrize("library", sorted(TESTED_RANGES))
def test_installed_version_is_in_tested_range(library: str) -> None:
    installed = version(library)
    assert SpecifierSet(TESTED_RANGES[library]).contains(installed, prereleases=True), (
        f"{library} {installed} is installed, outside the tested range {TESTED_RANGES[library]}"
    )


def test_floors_are_the_dependency_floors() -> None:
    """Each pin of the floors environment is the floor that pyproject.toml states."""
    requirements = dependencies()
    pins = floors()
    for name in ("anomalib", "lightning", "torch", "torchvision", "torchmetrics"):
        assert name in pins, f"{name} is missing from .ci/floors.txt"
        assert pins[name] == lower_bound(requirements[name].specifier), (
            f".ci/floors.txt pins {name}=={pins[name]}, pyproject.toml says {requirements[name]}"
        )


def test_open_clip_floor_is_anomalibs() -> None:
    """open_clip's range comes from anomalib's ``[clip]`` extra; the floors environment pins its lowest version."""
    assert "clip" in dependencies()["anomalib"].extras, "the anomalib requirement lost its [clip] extra"
    stated = [Requirement(line) for line in requires("anomalib") or []]
    ranges = [r.specifier for r in stated if canonicalize_name(r.name) == "open-clip-torch"]
    assert ranges, "the installed anomalib states no open_clip range"
    assert floors()["open-clip-torch"] == lower_bound(ranges[0])


def test_classifiers_start_at_requires_python() -> None:
    """The classifiers list Python versions from the ``requires-python`` floor up, with no gap."""
    listed = sorted(
        Version(line.rsplit("::", 1)[1].strip())
        for line in project()["classifiers"]
        if line.startswith("Programming Language :: Python :: 3.")
    )
    assert listed, "no Python version among the classifiers"
    assert listed[0] == lower_bound(SpecifierSet(project()["requires-python"]))
    assert [version.minor for version in listed] == list(range(listed[0].minor, listed[-1].minor + 1))
