"""The README's commands and the Python examples in README and docs run as written."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(code, id=f"{p.name}-{i}")
        for p in DOCS
        for i, code in enumerate(_python_blocks(p))
    ],
)
def test_python_examples_run(source):
    exec(compile(source, "<doc>", "exec"), {})


def test_readme_has_the_two_setup_commands_on_top():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = first_block.group(1).strip().splitlines()
    assert lines[0] == "# install and run the main job"
    assert lines[1].endswith("kvblocks demo")
    assert lines[2] == "# run the tests"
    assert lines[3].endswith("python -m pytest")
    assert "# run the tests" in (ROOT / ".ci" / "run").read_text()


def test_code_is_lint_clean():
    pytest.importorskip("ruff")
    folders = [d for d in ("src", "tests", "bench") if (ROOT / d).is_dir()]
    for args in (["check"], ["format", "--check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *args, *folders],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_is_marked_typed():
    """PEP 561: the marker is in the package and in the package data a wheel ships."""
    assert (ROOT / "src" / "kvblocks" / "py.typed").is_file()
    assert 'kvblocks = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
