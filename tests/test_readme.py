"""The README's Python examples run as written."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
    if "import torch" in code:
        pytest.importorskip("torch", reason="this README example uses torch")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text.split("## Set up", 1)[1].split("\n## ", 1)[0],
                        flags=re.S)
    assert [b.strip() for b in blocks] == [
        "pip install . torch==2.13.0 && python -m fastopt bench",
        'pip install ".[test,integrations,distributed]" torch==2.13.0 && pytest']
    # CI runs the README's test command
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci
