"""The Colab demo notebook is valid and its Python compiles (shell `!` and magic `%` lines aside)."""
import ast
import json
import os

from helpers import REPO

NOTEBOOK = os.path.join(REPO, "colab", "vljax_lit_demo.ipynb")


def test_notebook_is_valid_and_compiles():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 5
    for i, cell in enumerate(code):
        src = "".join(cell["source"])
        python = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%")))
        ast.parse(python, filename=f"cell {i}")
    text = json.dumps(nb)
    for step in ("scripts/setup.sh", "vljax.main", "Predictor.load", "classify", "plt."):
        assert step in text, step
