"""Every Python snippet in the README runs as written (in a scratch folder: runs/ lands there)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    pytest.importorskip("sklearn")  # the digits data
    monkeypatch.chdir(tmp_path)
    code = compile(SNIPPETS[index], f"README.md python snippet {index + 1}", "exec")
    exec(code, {"__name__": f"readme_snippet_{index + 1}"})
