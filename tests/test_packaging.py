"""Packaging: the wheel and sdist a user would install, built offline from a copy of this checkout.

The build uses this interpreter's setuptools (the test extra asks for one that reads the license
expression) without build isolation or an index, so it needs no network. It runs on a copy so that
the checkout gets no build/ or egg-info debris, and the packages it must hold are discovered from
the source tree: a subpackage added later (greenleader/contrib/...) is checked without listing it.
"""

from __future__ import annotations

import configparser
import email.parser
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "greenleader"
# What a build reads (setup.cfg: metadata, MANIFEST.in: the sdist's extra directories).
BUILD_FILES = ["setup.cfg", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "ruff.toml"]
BUILD_DIRS = ["greenleader", "docs", "examples", "tests", "benchmarks", "scripts"]
DEBRIS = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info", "*.log", ".pytest_cache")
BUILD_TIMEOUT = 300  # seconds; a build takes 3-10 s, far more on a loaded 2-core machine

pytestmark = pytest.mark.timeout(2 * BUILD_TIMEOUT + 60)


@dataclass
class Built:
    wheel: Path
    sdist: Path
    output: str  # everything pip and setuptools printed, warnings included


def package_files() -> list[str]:
    """Every file of the package in the source tree, as a path in the wheel."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo", ".log")
    )


def package_dirs() -> list[str]:
    """Every directory under greenleader/ that holds Python code: each must be a package."""
    return sorted({Path(name).parent.as_posix() for name in package_files() if name.endswith(".py")})


def run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    output = f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"the build failed (rc {done.returncode}):\n{output}"
    return output


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, (
        f"setuptools {setuptools.__version__} cannot read setup.cfg's license_expression: "
        "pip install -e '.[test]' installs a recent one"
    )
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, source / name)
    for name in BUILD_DIRS:
        shutil.copytree(ROOT / name, source / name, ignore=DEBRIS)
    out = base / "dist"
    # -v: pip shows the backend's output (its warnings) only when asked to.
    output = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "--disable-pip-version-check", "-v", "--wheel-dir", str(out), str(source)], cwd=base)
    sdist_code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    output += run([sys.executable, "-W", "always", "-c", sdist_code, str(out)], cwd=source)
    (wheel,) = out.glob("greenleader-*.whl")
    (sdist,) = out.glob("greenleader-*.tar.gz")
    return Built(wheel, sdist, output)


def wheel_names(built: Built) -> set[str]:
    with zipfile.ZipFile(built.wheel) as wheel:
        return set(wheel.namelist())


def metadata(built: Built) -> email.message.Message:
    with zipfile.ZipFile(built.wheel) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_the_build_prints_no_deprecation_warning(built: Built) -> None:
    lines = [line for line in built.output.splitlines()
             if "SetuptoolsDeprecationWarning" in line or "DEPRECATION" in line]
    assert not lines, "the build warned:\n" + "\n".join(lines) + "\n\nfull output:\n" + built.output


def test_the_wheel_holds_every_package_and_file_of_the_source_tree(built: Built) -> None:
    names = wheel_names(built)
    assert "greenleader/py.typed" in names
    for required in ("greenleader/stores", "greenleader/contrib"):
        assert required in package_dirs(), f"{required} has no Python files in the source tree"
    missing_init = [d for d in package_dirs() if f"{d}/__init__.py" not in names]
    assert not missing_init, f"not packages in the wheel (an __init__.py missing?): {missing_init}"
    missing = [name for name in package_files() if name not in names]
    assert not missing, f"files of the source tree missing from the wheel: {missing}"


def test_the_wheel_and_the_sdist_carry_the_license(built: Built) -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text, "LICENSE must hold the whole license text"
    assert re.search(r"^Copyright \d{4} the greenleader authors$", license_text, re.MULTILINE)
    with zipfile.ZipFile(built.wheel) as wheel:
        licenses = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/(licenses/)?LICENSE", n)]
        assert licenses, f"no LICENSE in the wheel's dist-info: {sorted(wheel.namelist())}"
        assert wheel.read(licenses[0]).decode() == license_text
    with tarfile.open(built.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for name in ("LICENSE", "README.md", "docs/safety.md", "greenleader/py.typed", "tests/test_packaging.py"):
        assert name in names, f"{name} missing from the sdist"


def test_the_metadata_matches_what_the_package_supports(built: Built) -> None:
    from trove_classifiers import classifiers as known

    meta = metadata(built)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Description-Content-Type"] == "text/markdown"
    classifiers = meta.get_all("Classifier") or []
    assert not [c for c in classifiers if c not in known], "classifiers PyPI does not know"
    assert not [c for c in classifiers if c.startswith("License ::")], "the license expression replaces them"
    assert {"Framework :: Django", "Framework :: Flask", "Typing :: Typed"} <= set(classifiers)
    # The Python versions listed start at python_requires' minimum, have no gap, and include this one.
    match = re.fullmatch(r">=\s*3\.(\d+)", meta["Requires-Python"])
    assert match, f"unexpected Requires-Python {meta['Requires-Python']!r}"
    minors = sorted(int(c.rsplit(".", 1)[1]) for c in classifiers
                    if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert minors and minors[0] == int(match.group(1)), (minors, meta["Requires-Python"])
    assert minors == list(range(minors[0], minors[-1] + 1)), f"a gap in the Python versions: {minors}"
    assert sys.version_info.minor in minors, f"this Python 3.{sys.version_info.minor} is not listed"
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
    assert {"Source", "Issues", "Documentation"} <= set(urls), urls
    # Every extra of setup.cfg is published (metrics included).
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg")
    extras = set(config["options.extras_require"])
    assert "metrics" in extras
    assert extras <= set(meta.get_all("Provides-Extra") or []), extras
