"""The README's Python example runs, so it cannot rot."""
import math
import pathlib
import re


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("## Python example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(reference_backend, capsys):
    namespace: dict = {}
    exec(compile(_example(), str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    values = [float(v) for v in re.findall(r"≈ (-?\d+\.\d+)", printed)]
    assert printed.startswith("joint log p(x)") and len(values) == 4
    assert all(math.isfinite(v) for v in values)
    assert namespace["cross"]["video"].shape == (256, 12)
