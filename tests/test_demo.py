import json
import math

from click.testing import CliRunner

from w2vcache.cli import main
from w2vcache.demo import SIMILARITY_NAME, DemoConfig, demo
from w2vcache.report import FROZEN_CNN_NOTE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_demo_runs_the_whole_workflow_end_to_end(tmp_path, capsys):
    # The demo's own steps at reduced size: one epoch each.
    out = tmp_path / "demo"
    result = demo(out, DemoConfig(probe_epochs=1, finetune_epochs=1, finetune_freeze_epochs=0), progress=True)
    printed = capsys.readouterr().out
    assert "random weights" in printed and "| layer |" in printed
    runs = out / "runs"
    layers = sorted(p.name for p in (runs / "probe").iterdir())
    assert layers == [f"layer{i:02d}" for i in range(5)] + ["weighted"]
    assert sorted(p.name for p in (runs / "finetune").iterdir()) == ["reinit-4", "reinit-none"]
    report = json.loads((runs / "report" / "report.json").read_text())
    assert len(report["rows"]) == 8  # 5 probes + the weighted probe + 2 fine-tuning variants
    for figure in ("png", "similarity_png"):
        assert result["paths"][figure].read_bytes()[:8] == PNG_SIGNATURE
    # The report says once that the fine-tunes keep the CNN frozen.
    assert printed.count(FROZEN_CNN_NOTE) == 1

    # The weighted probe's softmax weights: one per layer, adding up to 1 after every epoch.
    weights = json.loads((runs / "probe" / "weighted" / "seed0" / "layer_weights.json").read_text())
    assert weights and all(sorted(w["weights"]) == layers[:5] for w in weights)
    assert all(math.isclose(sum(w["weights"].values()), 1.0, rel_tol=1e-6) for w in weights)
    # The fine-tuned baseline's layers against the pre-trained ones: CKA in [0, 1] on the diagonal.
    cka = json.loads((runs / "similarity" / SIMILARITY_NAME / "similarity.json").read_text())
    assert cka["split"] == "dev" and cka["layers_a"] == cka["layers_b"] == layers[:5]
    assert cka["store_a"]["model"] == str(runs / "finetune" / "reinit-none" / "seed0")
    assert cka["store_b"]["model"] == "builtin:tiny"
    assert len(cka["diagonal"]) == 5 and all(0.0 <= v <= 1.0 + 1e-9 for v in cka["diagonal"])
    assert [s["name"] for s in report["similarity"]] == [SIMILARITY_NAME]

    # The last lines say what was reached: the probe chosen on dev by CER, each fine-tune, the
    # layer fine-tuning changed most, the weighted probe's heaviest layer.
    reached = result["reached"]
    best = min(report["rows"][:5], key=lambda row: row["cer_percent"]["dev"]["mean"])
    assert reached["best_probe_layer"] == best["label"]
    assert reached["best_probe_dev_cer_percent"] == best["cer_percent"]["dev"]["mean"]
    assert f"reached: best probe layer {best['label']} (chosen on dev): dev CER {best['cer_percent']['dev']['mean']:.1f} %" in printed
    assert printed.count("reached: fine-tune re-init") == 2 and "wall time" in printed
    lowest = min(range(5), key=lambda k: cka["diagonal"][k])
    assert reached["changed_most_layer"] == layers[lowest] and reached["changed_most_cka"] == cka["diagonal"][lowest]
    assert f"reached: fine-tuning changed {layers[lowest]} most (linear CKA {cka['diagonal'][lowest]:.3f}" in printed
    best_epoch = json.loads((runs / "probe" / "weighted" / "seed0" / "result.json").read_text())["best_epoch"]
    tested = next(w["weights"] for w in weights if w["epoch"] == best_epoch)  # the weights the report shows
    assert reached["weighted_top_weight"] == max(tested.values())
    assert reached["weighted_top_layer"] == max(tested, key=tested.get)
    assert f"heaviest layer {reached['weighted_top_layer']} (weight {max(tested.values()):.3f}" in printed

    # Re-running resumes: every step is already done, no run is trained again.
    trained = {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.jsonl")}
    demo(out, DemoConfig(probe_epochs=1, finetune_epochs=1, finetune_freeze_epochs=0), progress=True, num_threads=1)
    again = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.jsonl")} == trained
    assert "-> " not in again  # "probe layer00 seed 0 -> ..." announces a run being trained
    assert "random weights" in again and "reached: best probe layer" in again
    assert "reached: fine-tuning changed" in again and "reached: weighted probe" in again
    # The demo at its own size over those runs: they are not its runs, and it says which differs.
    other = CliRunner().invoke(main, ["demo", "--out", str(out), "--threads", "1"])
    assert other.exit_code == 1 and "holds a finished run with other settings (train.epochs: run has 1, now 22)" in other.output
