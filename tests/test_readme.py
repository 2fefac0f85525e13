"""The README's commands run as written (as onnx-graphsurgeon's example tests run their READMEs).

A bash block preceded by ``<!-- readme-test -->`` (optionally ``: expect "TEXT"``, repeated) is run line by
line from the repository root; ``pip install ... &&`` prefixes are dropped (the package is installed
already). Every command must exit 0 and the output must contain each expected text, so the numbers the
README quotes for these commands cannot drift.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- readme-test(?::(?P<expect>.*?))? -->\s*\n```bash\n(?P<body>.*?)```", re.S)


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    blocks = []
    for m in MARK.finditer(text):
        expects = re.findall(r'expect "([^"]*)"', m.group("expect") or "")
        commands = [c.strip() for c in m.group("body").replace("\\\n", " ").splitlines()]
        commands = [re.sub(r"^(pip install [^&]*&&\s*)+", "", c) for c in commands if c and not c.startswith("#")]
        blocks.append(pytest.param(commands, expects, id=commands[-1][:60]))
    return blocks


def test_the_readme_marks_blocks_to_test():
    assert len(readme_blocks()) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("commands, expects", readme_blocks())
def test_readme_block_runs_as_written(commands, expects):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    if shutil.which("onnx-tucker", path=env["PATH"]) is None:
        pytest.skip("the onnx-tucker entry point is not installed (pip install -e .)")
    output = ""
    for command in commands:
        r = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        output += r.stdout
    for text in expects:
        assert text in output, f"README says {text!r}; the command printed:\n{output[-3000:]}"
