import json

from click.testing import CliRunner

from w2vcache.cli import main
from w2vcache.demo import DemoConfig, demo


def test_demo_runs_the_whole_workflow_end_to_end(tmp_path, capsys):
    # The demo's own steps at reduced size: one epoch each.
    out = tmp_path / "demo"
    result = demo(out, DemoConfig(probe_epochs=1, finetune_epochs=1, finetune_freeze_epochs=0), progress=True)
    printed = capsys.readouterr().out
    assert "random weights" in printed and "| layer |" in printed
    runs = out / "runs"
    layers = sorted(p.name for p in (runs / "probe").iterdir())
    assert layers == [f"layer{i:02d}" for i in range(5)]
    assert sorted(p.name for p in (runs / "finetune").iterdir()) == ["reinit-4", "reinit-none"]
    report = json.loads((runs / "report" / "report.json").read_text())
    assert len(report["rows"]) == 7  # 5 probes + 2 fine-tuning variants
    png = result["paths"]["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The last lines say what was reached: the probe chosen on dev by CER, each fine-tune.
    best = min(report["rows"][:5], key=lambda row: row["cer_percent"]["dev"]["mean"])
    assert result["reached"]["best_probe_layer"] == best["label"]
    assert result["reached"]["best_probe_dev_cer_percent"] == best["cer_percent"]["dev"]["mean"]
    assert f"reached: best probe layer {best['label']} (chosen on dev): dev CER {best['cer_percent']['dev']['mean']:.1f} %" in printed
    assert printed.count("reached: fine-tune re-init") == 2 and "wall time" in printed
    # Re-running resumes: every step is already done, no run is trained again.
    trained = {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.jsonl")}
    again = CliRunner().invoke(main, ["demo", "--out", str(out), "--threads", "1"])
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.jsonl")} == trained
    assert "-> " not in again.output  # "probe layer00 seed 0 -> ..." announces a run being trained
    assert "random weights" in again.output and "reached: best probe layer" in again.output
