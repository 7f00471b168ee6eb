"""launch/sampling_notebook.ipynb runs top to bottom headless (nbclient, a fresh python3
kernel) on the tiny training budget and writes its outputs.

Parameters are injected the way papermill does it: a cell tagged `injected-parameters` right
after the cell tagged `parameters`. Any cell error fails the test (nbclient raises
CellExecutionError with the cell's traceback); every cell has a time limit.
"""

import pathlib

import pytest
from PIL import Image

nbformat = pytest.importorskip("nbformat", reason="pip install radar_jax[test] for nbformat")
nbclient = pytest.importorskip("nbclient", reason="pip install radar_jax[test] for nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "sampling_notebook.ipynb"
CELL_TIMEOUT_S = 420


def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_cells_have_ids_and_one_parameters_cell():
    nb = _notebook()
    nbformat.validate(nb)
    ids = [cell.get("id") for cell in nb.cells]
    assert all(ids) and len(set(ids)) == len(ids)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    for name in ("TRAIN_BUDGET", "WORKDIR", "OUTPUT_DIR", "LLAMAGEN_GPT", "LLAMAGEN_VQ",
                 "BATCH_SIZE"):
        assert f"\n{name} = " in "\n" + tagged[0].source, name
    # No cell needs a runtime restart: nothing is installed in editable mode.
    assert not any("install -e" in c.source or "--editable" in c.source
                   for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_headless_on_the_tiny_budget(tmp_path, monkeypatch):
    nb = _notebook()
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    out = tmp_path / "outputs"
    params = nbformat.v4.new_code_cell(
        "\n".join([f"TRAIN_BUDGET = 'tiny'", f"WORKDIR = {str(tmp_path / 'workdir')!r}",
                   f"OUTPUT_DIR = {str(out)!r}", f"REPO = {str(REPO)!r}", "BATCH_SIZE = 10",
                   "NUM_PER_CLASS = 2"]),
        metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, params)
    # The kernel inherits this environment: CPU only, and no writes to the user's home cache.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    with Image.open(out / "samples.png") as img:
        # 10 classes x 2 samples of 8x8 pixels (2-pixel gaps) upscaled 16x.
        assert img.size == ((2 * 10 + 2) * 16, (10 * 10 + 2) * 16)
    with Image.open(out / "growth.gif") as img:
        assert img.n_frames == 7  # the euclidean rings of the 8x8 grid
    with Image.open(out / "growth_wide.gif") as img:
        assert img.n_frames > 7 and img.width > img.height
    with Image.open(out / "editing.png") as img:
        # Three operations x 4 inputs, each row: input, mask, 3 results (8x8 pixels, 2-pixel
        # gaps), upscaled 16x.
        assert img.size == ((5 * 10 + 2) * 16, 3 * (4 * 10 + 2) * 16)
