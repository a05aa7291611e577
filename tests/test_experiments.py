"""Experiments: the papers' trends, the files each writes, the ablation variants."""

import json

import pytest
import torch

from mobilenet import create_model
from mobilenet.blocks import InvertedResidual
from mobilenet.cli import main
from mobilenet.cost import cost
from mobilenet.errors import MobileNetError
from mobilenet.experiments import EXPERIMENTS, run_experiment
from mobilenet.experiments.ablations import (
    ABLATIONS,
    ExpansionShortcuts,
    Setup,
    _expansion_shortcut,
    _no_shortcut,
    _relu6_bottleneck,
    run_ablation,
)
from mobilenet.experiments.tradeoff import measure, run_accuracy

from .helpers import randomize_bn

PNG = b"\x89PNG\r\n\x1a\n"


def _outputs_written(out, *pngs: str) -> None:
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG
    assert (out / "report.md").read_text().startswith("# ")
    assert not list(out.glob(".*.tmp"))


def test_relu_manifold_shows_the_papers_trend(tmp_path):
    summary = run_experiment("relu-manifold", tmp_path, quick=True)
    recovered = json.loads((tmp_path / "recovered.json").read_text())
    assert set(recovered) == {"2", "3", "5", "15", "30"}
    assert recovered["2"] < recovered["15"] and recovered["2"] < recovered["30"]
    assert recovered["2"] < 0.5 < 0.95 < recovered["30"]
    assert summary["trend_reproduced"] is True
    assert (tmp_path / "results.csv").read_text().startswith("n,recovered_fraction")
    _outputs_written(tmp_path, "relu_manifold.png", "relu_manifold_fraction.png")


def test_memory_reproduces_table_3_maxima(tmp_path):
    summary = run_experiment("memory", tmp_path, quick=True)
    assert summary["maxima_match_paper"]
    assert round(summary["v1_max_kb"]) == 1606 and round(summary["v2_max_kb"]) == 401
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["size"]: r for r in results["table3"]}
    assert rows[7]["v1_channels"] == 1024 and rows[7]["v2_channels"] == 320
    peak = results["peaks_fp32"][0]
    # The executor's peak is a fraction of the standard V2 forward's.
    assert peak["v2_efficient_measured_bytes"] < 0.5 * peak["v2_standard_bytes"]
    _outputs_written(tmp_path, "memory.png")


def test_tradeoff_measures_cost_scaling():
    rows = measure(True, families=("mobilenet_v2",), widths=(0.5, 1.0), resolutions=(96, 192))
    by = {(r["width_mult"], r["resolution"]): r for r in rows}
    assert by[(1.0, 192)]["madds"] == cost(create_model("mobilenet_v2"), 192).madds
    # Resolution multiplier: MAdds ~ rho^2, parameters unchanged (V1 Section 3.4).
    assert by[(1.0, 96)]["madds"] / by[(1.0, 192)]["madds"] == pytest.approx(0.25, rel=0.05)
    assert by[(1.0, 96)]["params"] == by[(1.0, 192)]["params"]
    assert by[(0.5, 192)]["madds"] < 0.4 * by[(1.0, 192)]["madds"]
    assert all(r["latency_ms"] > 0 for r in rows)


def test_tradeoff_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(MobileNetError, match="not a finished training run"):
        run_accuracy([str(tmp_path)])


def test_ablation_variants_change_only_what_they_name():
    torch.manual_seed(0)
    base = create_model("mobilenet_v2", width_mult=0.5, num_classes=10).eval()
    randomize_bn(base)
    x = torch.randn(2, 3, 64, 64)
    reference = base(x)
    keys = set(base.state_dict())
    blocks = [m for m in base.features if isinstance(m, InvertedResidual)]
    for change in (_relu6_bottleneck, _no_shortcut, _expansion_shortcut):
        variant = create_model("mobilenet_v2", width_mult=0.5, num_classes=10).eval()
        variant.load_state_dict(base.state_dict())
        variant = change(variant)
        assert set(variant.state_dict()) == keys  # same parameters, same names
        assert not torch.allclose(variant(x), reference)
        assert cost(variant, 64).madds == cost(base, 64).madds  # traceable, same cost
    shortcuts = _expansion_shortcut(create_model("mobilenet_v2", width_mult=0.5)).features
    assert isinstance(shortcuts, ExpansionShortcuts)
    # As many shortcuts as the published network has residual connections.
    assert len(shortcuts.linked) == sum(b.use_residual for b in blocks) == 10


@pytest.mark.slow
def test_an_ablation_end_to_end_and_reused(tmp_path, monkeypatch):
    tiny = Setup("digits", 32, 1, 0.25, (0, 1))
    monkeypatch.setattr("mobilenet.experiments.ablations.setup", lambda *args: tiny)
    summary = run_ablation("ablation-bottleneck", tmp_path, quick=True)
    assert set(summary) >= {"reproduced", "separated", "linear", "relu6"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in results["rows"]] == list(ABLATIONS["ablation-bottleneck"])
    assert all(len(r["top1_per_seed"]) == 2 for r in results["rows"])
    assert "mean" in (tmp_path / "report.md").read_text()
    _outputs_written(tmp_path, "ablation-bottleneck.png")
    # Finished runs are read back, not trained again.
    retrain = lambda *a, **k: pytest.fail("retrained")  # noqa: E731
    monkeypatch.setattr("mobilenet.classification.task.train", retrain)
    again = run_ablation("ablation-bottleneck", tmp_path, quick=True)
    assert again == summary


def test_experiment_cli(tmp_path, capsys):
    assert main(["experiment", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPERIMENTS)
    assert main(["experiment", "warp-drive"]) == 2
    assert "unknown experiment 'warp-drive'" in capsys.readouterr().err
    assert main(["experiment"]) == 2
    with pytest.raises(SystemExit):
        main(["experiment", "ablation-shortcut", "--seeds", "0"])
    out = tmp_path / "m"
    assert main(["experiment", "relu-manifold", "--quick", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["trend_reproduced"] is True
    assert (out / "report.md").is_file()
