"""examples/paper_workflow.py runs end to end on a tiny image and writes every figure."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "paper_workflow.py"
FIGURES = [
    "1_outliers",
    "2_scree",
    "3_nmf_loadings",
    "4_lengthscale_scan",
    "5_independent_vs_parallel",
    "6_training_history_parallel",
    "7_upsampled_edge_map",
    "8_upsampled_spectrum",
]


def test_paper_workflow_writes_every_figure(tmp_path, caplog):
    spec = importlib.util.spec_from_file_location("paper_workflow", SCRIPT)
    workflow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workflow)
    argv = [str(tmp_path), "--size", "16", "--channels", "64", "--nmf", "4", "--maps", "3"]
    with caplog.at_level("INFO", logger="paper_workflow"):
        assert workflow.main(argv) == 0
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == FIGURES
    assert all((tmp_path / f"{name}.png").stat().st_size > 10_000 for name in FIGURES)
    assert "Suggested lengthscale_bounds" in caplog.text
    assert "(32, 32|64)" in caplog.text  # the upsampled spectrum image
