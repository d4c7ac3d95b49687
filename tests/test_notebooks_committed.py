"""The committed notebooks are exactly what tools/make_notebooks.py writes:
no outputs (a 5 MB widget bundle per output is not for git), and no notebook
edited by hand and forgotten in the generator."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_notebooks_carry_no_outputs_and_match_their_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tools" / "make_notebooks.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.write_all(tmp_path)
    committed = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.ipynb"))
    for name in committed:
        notebook = json.loads((ROOT / "notebooks" / name).read_text())
        assert all(
            not cell.get("outputs") and cell.get("execution_count") is None
            for cell in notebook["cells"]
            if cell["cell_type"] == "code"
        ), name
        assert (ROOT / "notebooks" / name).read_text() == (tmp_path / name).read_text(), (
            f"{name} differs from its generator"
        )
