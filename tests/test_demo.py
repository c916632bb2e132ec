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
    # re-running resumes: every step is already done
    again = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "0 run(s) trained" not in again.output  # the library prints per-step, the CLI nothing extra
    assert "random weights" in again.output
