"""The README's Python examples run as written, and its two commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert tuple(namespace["y"].shape) == (2, 16, 4, 128)
    assert namespace["ctok"].compressed_vocab_size < namespace["ctok"].vocab_size


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in readme and "python -m pytest" in ci
    assert "pip install torch==2.13.0" in readme and "pip install torch==2.13.0" in ci
    assert 'pip install -e ".[dev]"' in readme and 'pip install -e ".[dev]"' in ci
