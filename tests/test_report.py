"""report: run directories written by hand (docs/RUNS.md) -> table, CSV, JSON, figure, command line.

Every expected number is worked out by hand from the metrics written below, in percent as
result.json holds them: three values a-d, a, a+d have mean a and sample standard deviation d; two
values a, b have mean (a+b)/2 and sample standard deviation |a-b|/sqrt(2) (2/sqrt(2) = 1.414 -> "1.41").
"""

import csv
import json
import struct

import pytest
from click.testing import CliRunner

from w2vcache.cli import main
from w2vcache.errors import W2VCacheError
from w2vcache.report import find_runs, summarize, write_report
from w2vcache.report_cli import report_command

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPLITS = ("dev", "test-clean", "test-other")

# (dev WER, test-clean WER, test-other WER, dev CER, test-clean CER, test-other CER) per seed, in %.
PROBES = {
    0: {0: (50.0, 48.0, 70.0, 20.0, 19.0, 30.0),
        1: (52.0, 50.0, 72.0, 22.0, 21.0, 32.0),
        2: (54.0, 52.0, 74.0, 24.0, 23.0, 34.0)},
    4: {0: (20.0, 19.0, 35.0, 8.0, 7.0, 15.0),  # seed 2 unfinished: n=2
        1: (22.0, 21.0, 39.0, 10.0, 9.0, 17.0)},
    8: {0: (10.0, 9.0, 20.0, 3.0, 2.0, 7.0),
        1: (12.0, 11.0, 23.0, 4.0, 3.0, 8.0),
        2: (14.0, 13.0, 26.0, 5.0, 4.0, 9.0)},
    12: {0: (30.0, 28.0, 45.0, 12.0, 11.0, 20.0)},  # seed 1 failed: n=1
}
# The published fine-tuning means (none 10.71/19.47, 12: 10.93/19.58, ...) spread by 0.1 %.
FINETUNES = {
    (): {0: (9.0, 10.61, 19.37, 3.0, 4.0, 8.0),
         1: (10.0, 10.71, 19.47, 3.0, 4.0, 8.0),
         2: (11.0, 10.81, 19.57, 3.0, 4.0, 8.0)},
    (12,): {0: (10.0, 10.83, 19.48, 3.0, 4.0, 8.0),
            1: (11.0, 10.93, 19.58, 3.0, 4.0, 8.0),
            2: (12.0, 11.03, 19.68, 3.0, 4.0, 8.0)},
    (11, 12): {0: (10.0, 10.72, 19.35, 3.0, 4.0, 8.0),  # seed 1 failed: n=2
               2: (10.0, 10.92, 19.55, 3.0, 4.0, 8.0)},
    (10, 11, 12): {0: (12.0, 11.39, 21.08, 4.0, 5.0, 9.0),
                   1: (13.0, 11.49, 21.18, 4.0, 5.0, 9.0),
                   2: (14.0, 11.59, 21.28, 4.0, 5.0, 9.0)},
}

# Markdown cells, by hand from the values above.
PROBE_TABLE = {
    "0": {"seeds": "0,1,2", "dev WER": "52.00 ± 2.00 (n=3)", "test-clean WER": "50.00 ± 2.00 (n=3)",
          "test-other WER": "72.00 ± 2.00 (n=3)", "dev CER": "22.00 ± 2.00 (n=3)",
          "test-clean CER": "21.00 ± 2.00 (n=3)", "test-other CER": "32.00 ± 2.00 (n=3)"},
    "4": {"seeds": "0,1", "dev WER": "21.00 ± 1.41 (n=2)", "test-clean WER": "20.00 ± 1.41 (n=2)",
          "test-other WER": "37.00 ± 2.83 (n=2)", "dev CER": "9.00 ± 1.41 (n=2)",
          "test-clean CER": "8.00 ± 1.41 (n=2)", "test-other CER": "16.00 ± 1.41 (n=2)"},
    "8": {"seeds": "0,1,2", "dev WER": "12.00 ± 2.00 (n=3)", "test-clean WER": "11.00 ± 2.00 (n=3)",
          "test-other WER": "23.00 ± 3.00 (n=3)", "dev CER": "4.00 ± 1.00 (n=3)",
          "test-clean CER": "3.00 ± 1.00 (n=3)", "test-other CER": "8.00 ± 1.00 (n=3)"},
    "12": {"seeds": "0", "dev WER": "30.00 (n=1)", "test-clean WER": "28.00 (n=1)",
           "test-other WER": "45.00 (n=1)", "dev CER": "12.00 (n=1)",
           "test-clean CER": "11.00 (n=1)", "test-other CER": "20.00 (n=1)"},
}
FINETUNE_TABLE = {
    "none": {"seeds": "0,1,2", "dev WER": "10.00 ± 1.00 (n=3)", "test-clean WER": "10.71 ± 0.10 (n=3)",
             "test-other WER": "19.47 ± 0.10 (n=3)", "Δ dev": "+0.00", "Δ test-clean": "+0.00",
             "Δ test-other": "+0.00", "dev CER": "3.00 ± 0.00 (n=3)", "test-clean CER": "4.00 ± 0.00 (n=3)",
             "test-other CER": "8.00 ± 0.00 (n=3)"},
    "12": {"seeds": "0,1,2", "dev WER": "11.00 ± 1.00 (n=3)", "test-clean WER": "10.93 ± 0.10 (n=3)",
           "test-other WER": "19.58 ± 0.10 (n=3)", "Δ dev": "+1.00", "Δ test-clean": "+0.22",
           "Δ test-other": "+0.11", "dev CER": "3.00 ± 0.00 (n=3)", "test-clean CER": "4.00 ± 0.00 (n=3)",
           "test-other CER": "8.00 ± 0.00 (n=3)"},
    "11,12": {"seeds": "0,2", "dev WER": "10.00 ± 0.00 (n=2)", "test-clean WER": "10.82 ± 0.14 (n=2)",
              "test-other WER": "19.45 ± 0.14 (n=2)", "Δ dev": "+0.00", "Δ test-clean": "+0.11",
              "Δ test-other": "-0.02", "dev CER": "3.00 ± 0.00 (n=2)", "test-clean CER": "4.00 ± 0.00 (n=2)",
              "test-other CER": "8.00 ± 0.00 (n=2)"},
    "10,11,12": {"seeds": "0,1,2", "dev WER": "13.00 ± 1.00 (n=3)", "test-clean WER": "11.49 ± 0.10 (n=3)",
                 "test-other WER": "21.18 ± 0.10 (n=3)", "Δ dev": "+3.00", "Δ test-clean": "+0.78",
                 "Δ test-other": "+1.71", "dev CER": "4.00 ± 0.00 (n=3)", "test-clean CER": "5.00 ± 0.00 (n=3)",
                 "test-other CER": "9.00 ± 0.00 (n=3)"},
}
NOT_INCLUDED = [
    "- not included: probe/layer04/seed2 (unfinished, 4 of 10 epochs done)",
    "- not included: probe/layer07/seed0 (unfinished)",
    "- not included: probe/layer12/seed1 (failed: CUDA out of memory)",
    "- not included: finetune/reinit-11-12/seed1 (failed: loss is NaN at epoch 3)",
]


def experiment(kind, layer, reinit):
    if kind == "probe":
        return f"layer{layer:02d}"
    return "reinit-" + ("-".join(map(str, reinit)) if reinit else "none")


def write_run(root, kind, seed, values=None, layer=None, reinit=(), status="finished", epochs_done=10,
              error=None, splits=SPLITS, lr=1e-4, prefix="", name=None, fractions=False, probe=None, weights=None):
    """One run directory as probe/finetune write it: config.json, metrics.jsonl, result.json.
    `values` in percent; `fractions`: as earlier versions wrote them, 0.21 for 21 % under "wer".
    `probe` ("bilstm", "linear"): records it as this version does; without it, as earlier versions
    did. `weights`: a weighted probe's layer_weights.json, {epoch: {layer: weight}}."""
    name = name or experiment(kind, layer, reinit)
    directory = root / prefix / kind / name / f"seed{seed}"
    directory.mkdir(parents=True)
    ident = {"kind": kind, "experiment": name, "layer": layer, "reinit": list(reinit), "seed": seed}
    if probe is not None:
        ident.update(probe=probe, weighted=weights is not None)
    if weights is not None:
        (directory / "layer_weights.json").write_text(json.dumps(
            [{"epoch": epoch, "weights": w} for epoch, w in weights.items()]))
    config = {**ident, "train": {"epochs": 10, "lr": lr, "seed": seed}, "model": {"hidden": 1024},
              "data": {"store": "features.zarr"}, "versions": {}, "command": ["w2vcache", kind],
              "started": "2026-11-25T12:00:00+00:00"}
    (directory / "config.json").write_text(json.dumps(config))
    with open(directory / "metrics.jsonl", "w") as f:
        for epoch in range(1, epochs_done + 1):
            rates = {"dev_wer": 0.5, "dev_cer": 0.2} if fractions else {"dev_wer_percent": 50.0, "dev_cer_percent": 20.0}
            f.write(json.dumps({"epoch": epoch, "train_loss": 1.0, "lr": 1e-4, **rates, "seconds": 1.0, "updates": 4}) + "\n")
    if status == "unfinished":
        return directory
    result = {**ident, "status": status, "best_epoch": 7, "epochs": 10,
              "timings": {"total_s": 1.0, "train_s": 0.8, "eval_s": 0.2}, "finished": "2026-11-25T13:00:00+00:00"}
    if status == "failed":
        result["error"] = error
    else:
        wers, cers = values[: len(values) // 2], values[len(values) // 2:]
        for split, wer, cer in zip(splits, wers, cers):
            rates = {"wer": wer / 100, "cer": cer / 100} if fractions else {"wer_percent": wer, "cer_percent": cer}
            result[split] = {**rates, "words": 1000, "utterances": 100}
    (directory / "result.json").write_text(json.dumps(result))
    return directory


def write_probes(root, **kw):
    for layer, seeds in PROBES.items():
        for seed, values in seeds.items():
            write_run(root, "probe", seed, values, layer=layer, **kw)
    write_run(root, "probe", 2, layer=4, status="unfinished", epochs_done=4, **kw)
    write_run(root, "probe", 0, layer=7, status="unfinished", epochs_done=0, **kw)  # nothing finished at 7
    write_run(root, "probe", 1, layer=12, status="failed", error="CUDA out of memory\nTraceback ...", **kw)


def write_finetunes(root, **kw):
    for reinit, seeds in FINETUNES.items():
        for seed, values in seeds.items():
            write_run(root, "finetune", seed, values, reinit=reinit, **kw)
    write_run(root, "finetune", 1, reinit=(11, 12), status="failed", error="loss is NaN at epoch 3", **kw)


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_probes(root)
    write_finetunes(root)
    return root


def markdown_tables(text):
    """{section heading: {first cell: {column: cell}}} for every table in the Markdown."""
    tables, heading, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:], None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                tables.setdefault(heading, {})[cells[0]] = dict(zip(header[1:], cells[1:]))
        else:
            header = None
    return tables


def runner():
    """A CliRunner that keeps stderr apart from stdout (click 8.1 needs asking; 8.2 always does)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------


def test_find_runs_reads_every_run_with_its_status(runs):
    found = find_runs(runs)
    assert len(found) == 9 + 3 + 11 + 1  # finished probes, other probes, finished fine-tunes, failed
    by_name = {r.name: r for r in found}
    assert by_name["probe/layer04/seed2"].status == "unfinished"
    assert by_name["probe/layer04/seed2"].epochs_done == 4
    assert by_name["probe/layer12/seed1"].status == "failed"
    assert by_name["probe/layer12/seed1"].error.startswith("CUDA out of memory")
    run = by_name["finetune/reinit-11-12/seed2"]
    assert (run.kind, run.experiment, run.layer, run.reinit, run.seed) == ("finetune", "reinit-11-12", None, [11, 12], 2)
    assert run.metrics == {"dev": {"wer_percent": 10.0, "cer_percent": 3.0},
                           "test-clean": {"wer_percent": 10.92, "cer_percent": 4.0},
                           "test-other": {"wer_percent": 19.55, "cer_percent": 8.0}}
    assert run.best_epoch == 7 and run.status == "finished"


def test_markdown_table_has_every_number_worked_out_by_hand(runs, tmp_path):
    written = write_report(runs, tmp_path / "out")
    text = written["md"].read_text()
    tables = markdown_tables(text)
    probes = tables["Probes (frozen W2V layer, BiLSTM-CTC)"]
    tunes = tables["Fine-tuning (W2V + CTC head, re-initialised blocks)"]
    assert list(probes) == ["0", "4", "8", "12"]  # by layer; layer 7 has no finished run
    assert probes == PROBE_TABLE
    assert list(tunes) == ["none", "12", "11,12", "10,11,12"]
    assert tunes == FINETUNE_TABLE
    assert "Best layer: 8 (lowest mean dev WER, 12.00 %)." in text
    # Seed 1 of 11,12 failed: its Δ is a difference of means over seeds 0,2 and 0,1,2.
    assert ("The seeds of 11,12 are not the baseline's (0,1,2): their Δ compares means over different seeds."
            in text)
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("- not included")] == NOT_INCLUDED
    assert "![WER by layer and by re-initialised blocks](report.png)" in text


def test_summarize_rows_and_deltas(runs):
    rows = summarize(find_runs(runs))
    assert [(r.kind, r.label, r.n) for r in rows] == [
        ("probe", "0", 3), ("probe", "4", 2), ("probe", "8", 3), ("probe", "12", 1),
        ("finetune", "none", 3), ("finetune", "12", 3), ("finetune", "11,12", 2), ("finetune", "10,11,12", 3)]
    layer8 = rows[2]
    assert layer8.wer_percent["dev"].mean == pytest.approx(12.0) and layer8.wer_percent["dev"].std == pytest.approx(2.0)
    assert layer8.cer_percent["test-other"].mean == pytest.approx(8.0)
    assert layer8.cer_percent["test-other"].std == pytest.approx(1.0)
    assert rows[1].wer_percent["test-other"].std == pytest.approx(4.0 / 2 ** 0.5)
    assert rows[3].wer_percent["dev"].std is None and rows[3].not_included == ["probe/layer12/seed1"]
    assert rows[1].not_included == ["probe/layer04/seed2"]
    assert layer8.delta_wer_points == {}
    reinit_10_11_12 = rows[7]
    assert reinit_10_11_12.delta_wer_points["test-clean"] == pytest.approx(11.49 - 10.71)
    assert reinit_10_11_12.delta_wer_points["test-other"] == pytest.approx(21.18 - 19.47)
    assert rows[6].delta_wer_points["test-other"] == pytest.approx(19.45 - 19.47)
    assert rows[6].seeds == [0, 2]


def test_csv_and_json(runs, tmp_path):
    written = write_report(runs, tmp_path / "out")
    with open(written["csv"], newline="") as f:
        lines = list(csv.DictReader(f))
    assert [(r["kind"], r["layer"], r["reinit"]) for r in lines] == [
        ("probe", "0", ""), ("probe", "4", ""), ("probe", "8", ""), ("probe", "12", ""),
        ("finetune", "", "none"), ("finetune", "", "12"), ("finetune", "", "11,12"), ("finetune", "", "10,11,12")]
    layer8, layer12, reinit12 = lines[2], lines[3], lines[5]
    assert (layer8["experiment"], layer8["n"], layer8["seeds"]) == ("layer08", "3", "0 1 2")
    assert float(layer8["dev_wer_percent_mean"]) == pytest.approx(12.0)
    assert float(layer8["dev_wer_percent_std"]) == pytest.approx(2.0)
    assert float(layer8["test-other_wer_percent_std"]) == pytest.approx(3.0)
    assert float(layer8["test-clean_cer_percent_mean"]) == pytest.approx(3.0)
    assert layer8["dev_wer_percent_n"] == "3" and layer8["test-clean_delta_wer_points"] == ""
    assert layer12["dev_wer_percent_std"] == "" and float(layer12["dev_wer_percent_mean"]) == pytest.approx(30.0)
    assert float(reinit12["test-clean_delta_wer_points"]) == pytest.approx(0.22)
    assert float(reinit12["test-other_delta_wer_points"]) == pytest.approx(0.11)
    assert float(reinit12["dev_delta_wer_points"]) == pytest.approx(1.0)

    report = json.loads(written["json"].read_text())
    assert report["splits"] == ["dev", "test-clean", "test-other"]
    assert report["best_layer"] == {"layer": 8, "experiment": "layer08", "by": "dev wer"}
    assert len(report["rows"]) == 8 and len(report["runs"]) == 24
    row = report["rows"][2]
    assert row["layer"] == 8 and row["seeds"] == [0, 1, 2] and row["delta_wer_points"] is None
    assert row["wer_percent"]["test-other"]["mean"] == pytest.approx(23.0)
    assert row["wer_percent"]["test-other"]["std"] == pytest.approx(3.0) and row["wer_percent"]["test-other"]["n"] == 3
    assert report["rows"][3]["wer_percent"]["dev"]["std"] is None
    assert report["rows"][4]["delta_wer_points"] == {"dev": 0.0, "test-clean": 0.0, "test-other": 0.0}
    statuses = {r["name"]: r["status"] for r in report["runs"]}
    assert statuses["probe/layer07/seed0"] == "unfinished" and statuses["finetune/reinit-11-12/seed1"] == "failed"
    assert [r["name"] for r in report["not_included"]] == [
        "probe/layer04/seed2", "probe/layer07/seed0", "probe/layer12/seed1", "finetune/reinit-11-12/seed1"]
    assert report["notes"] == []


def same_numbers(a, b) -> bool:
    """Equal JSON values, numbers up to float rounding (x / 100 * 100 need not give back x)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_numbers, a, b))
    if isinstance(a, float):
        return b == pytest.approx(a)
    return a == b


def test_runs_of_earlier_versions_in_fractions_are_reported_in_the_same_percent(runs, tmp_path):
    """Earlier versions wrote result.json's rates as fractions under "wer" and "cer" (0.21 = 21 %):
    the same runs written that way give the same tables, and a fraction above 1 is a WER above 100 %."""
    old = tmp_path / "old"
    write_probes(old, fractions=True)
    write_finetunes(old, fractions=True)
    assert json.loads((old / "probe/layer08/seed0/result.json").read_text())["dev"]["wer"] == PROBES[8][0][0] / 100
    new_report = write_report(runs, tmp_path / "new-report", figure=False)
    old_report = write_report(old, tmp_path / "old-report", figure=False)
    text = old_report["md"].read_text()
    assert markdown_tables(text) == markdown_tables(new_report["md"].read_text())
    assert markdown_tables(text) == {"Probes (frozen W2V layer, BiLSTM-CTC)": PROBE_TABLE,
                                     "Fine-tuning (W2V + CTC head, re-initialised blocks)": FINETUNE_TABLE}
    assert "Best layer: 8 (lowest mean dev WER, 12.00 %)." in text
    old_json, new_json = (json.loads(r["json"].read_text()) for r in (old_report, new_report))
    assert same_numbers(old_json["rows"], new_json["rows"])
    assert same_numbers([r["metrics"] for r in old_json["runs"]], [r["metrics"] for r in new_json["runs"]])
    with open(old_report["csv"], newline="") as f, open(new_report["csv"], newline="") as g:
        old_csv, new_csv = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [list(line) for line in old_csv] == [list(line) for line in new_csv]
    for old_line, new_line in zip(old_csv, new_csv):
        for column, value in new_line.items():
            assert old_line[column] == value or float(old_line[column]) == pytest.approx(float(value)), column

    # Seeds written by both versions average together; an earlier version's "wer": 25.47 is 2547 %.
    mixed = tmp_path / "mixed"
    seed0, seed1, babbling = (10.0, 10.0, 20.0, 5.0, 5.0, 10.0), (12.0, 12.0, 22.0, 6.0, 6.0, 11.0), 2547.0
    write_run(mixed, "probe", 0, seed0, layer=8)
    write_run(mixed, "probe", 1, seed1, layer=8, fractions=True)
    write_run(mixed, "probe", 0, (babbling, babbling, babbling, 90.0, 90.0, 90.0), layer=2, fractions=True)
    assert json.loads((mixed / "probe/layer02/seed0/result.json").read_text())["dev"]["wer"] > 1
    written = write_report(mixed, figure=False)
    table = markdown_tables(written["md"].read_text())["Probes (frozen W2V layer, BiLSTM-CTC)"]
    mean, std = (seed0[0] + seed1[0]) / 2, abs(seed0[0] - seed1[0]) / 2 ** 0.5
    assert table["8"]["dev WER"] == f"{mean:.2f} ± {std:.2f} (n=2)"
    assert table["2"]["dev WER"] == f"{babbling:.2f} (n=1)" and babbling > 100
    row = json.loads(written["json"].read_text())["rows"][0]
    assert row["layer"] == 2 and row["wer_percent"]["dev"]["mean"] == pytest.approx(babbling)


def test_figure_is_a_png_of_the_documented_size(runs, tmp_path):
    written = write_report(runs, tmp_path / "out", formats=())
    assert set(written) == {"png"}
    assert png_size(written["png"]) == (1000, 400)  # two panels of 5 x 4 inches at 100 dpi


def test_probes_only(tmp_path):
    root = tmp_path / "runs"
    write_probes(root)
    written = write_report(root)
    assert written["png"].parent == root / "report"
    assert png_size(written["png"]) == (500, 400)  # one panel
    text = written["md"].read_text()
    assert markdown_tables(text) == {"Probes (frozen W2V layer, BiLSTM-CTC)": PROBE_TABLE}
    assert "Fine-tuning" not in text and "Δ" not in text
    # The report folder inside RUNS is not mistaken for a run on the next report.
    assert len(find_runs(root)) == 12 and write_report(root)["md"].read_text() == text


def test_finetunes_only_without_baseline_and_with_another_test_split(tmp_path):
    root = tmp_path / "runs"
    splits = ("test-clean", "test-other", "test-noisy")
    for seed, values in {0: (11.0, 20.0, 30.0, 4.0, 8.0, 12.0), 1: (13.0, 22.0, 36.0, 5.0, 9.0, 13.0)}.items():
        write_run(root, "finetune", seed, values, reinit=(12,), splits=splits)
    write_run(root, "finetune", 0, (15.0, 25.0, 40.0, 5.0, 10.0, 15.0), reinit=(11, 12), splits=splits)
    written = write_report(root)
    assert png_size(written["png"]) == (500, 400)
    text = written["md"].read_text()
    assert "Probes" not in text and "Best layer" not in text
    assert "Δ: not computed, no fine-tuning baseline (re-init none) has finished." in text
    assert markdown_tables(text) == {"Fine-tuning (W2V + CTC head, re-initialised blocks)": {
        "12": {"seeds": "0,1", "test-clean WER": "12.00 ± 1.41 (n=2)", "test-other WER": "21.00 ± 1.41 (n=2)",
               "test-noisy WER": "33.00 ± 4.24 (n=2)", "Δ test-clean": "-", "Δ test-other": "-",
               "Δ test-noisy": "-", "test-clean CER": "4.50 ± 0.71 (n=2)",
               "test-other CER": "8.50 ± 0.71 (n=2)", "test-noisy CER": "12.50 ± 0.71 (n=2)"},
        "11,12": {"seeds": "0", "test-clean WER": "15.00 (n=1)", "test-other WER": "25.00 (n=1)",
                  "test-noisy WER": "40.00 (n=1)", "Δ test-clean": "-", "Δ test-other": "-",
                  "Δ test-noisy": "-", "test-clean CER": "5.00 (n=1)",
                  "test-other CER": "10.00 (n=1)", "test-noisy CER": "15.00 (n=1)"},
    }}
    report = json.loads(written["json"].read_text())
    assert report["splits"] == ["test-clean", "test-other", "test-noisy"] and report["best_layer"] is None
    assert report["rows"][0]["delta_wer_points"] == {"test-clean": None, "test-other": None, "test-noisy": None}
    with open(written["csv"], newline="") as f:
        assert float(next(csv.DictReader(f))["test-noisy_wer_percent_mean"]) == pytest.approx(33.0)


def test_probe_without_dev_picks_best_layer_by_test_clean(tmp_path):
    root = tmp_path / "runs"
    for layer, wer in ((6, 30.0), (8, 20.0), (10, 25.0)):
        write_run(root, "probe", 0, (wer, wer, 10.0, 10.0), layer=layer, splits=("test-clean", "test-other"))
    text = write_report(root)["md"].read_text()
    assert "Best layer: 8 (lowest mean test-clean WER, 20.00 %)." in text


def test_a_best_layer_by_cer_that_differs_is_named_too(tmp_path):
    """Near 100 % WER (a few minutes of speech, as in the demo) the layers differ by CER."""
    root = tmp_path / "runs"
    write_run(root, "probe", 0, (99.0, 99.0, 99.0, 60.0, 61.0, 62.0), layer=2)
    write_run(root, "probe", 0, (97.0, 98.0, 99.0, 70.0, 71.0, 72.0), layer=3)
    text = write_report(root)["md"].read_text()
    assert "Best layer: 3 (lowest mean dev WER, 97.00 %). By dev CER: 2 (60.00 %)." in text


def test_cnn_output_probe_comes_before_layer_0(tmp_path):
    # probe.py names the CNN-output experiment "cnn" and gives it no layer number.
    root = tmp_path / "runs"
    write_run(root, "probe", 0, (60.0, 60.0, 80.0, 30.0, 30.0, 40.0), layer=0)
    write_run(root, "probe", 0, (5.0, 5.0, 10.0, 2.0, 2.0, 5.0), name="cnn")
    written = write_report(root)
    text = written["md"].read_text()
    assert list(markdown_tables(text)["Probes (frozen W2V layer, BiLSTM-CTC)"]) == ["cnn", "0"]
    assert "Best layer: cnn (lowest mean dev WER, 5.00 %)." in text
    assert json.loads(written["json"].read_text())["best_layer"] == {"layer": None, "experiment": "cnn", "by": "dev wer"}
    assert png_size(written["png"]) == (500, 400)


def test_failed_run_shows_the_line_of_its_error_that_matters(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "probe", 0, (10.0, 10.0, 10.0, 10.0), layer=8, splits=("test-clean", "test-other"))
    write_run(root, "probe", 1, layer=8, status="failed",
              error='Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: CUDA error')
    assert "- not included: probe/layer08/seed1 (failed: RuntimeError: CUDA error)" in write_report(root)["md"].read_text()


def test_runs_at_any_depth_and_differing_configs_are_noted(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "probe", 0, (10.0, 10.0, 20.0, 5.0, 5.0, 10.0), layer=8, prefix="alice/sweep")
    write_run(root, "probe", 1, (12.0, 12.0, 20.0, 5.0, 5.0, 10.0), layer=8, prefix="bob", lr=3e-4)
    written = write_report(root)
    text = written["md"].read_text()
    assert markdown_tables(text)["Probes (frozen W2V layer, BiLSTM-CTC)"]["8"]["dev WER"] == "11.00 ± 1.41 (n=2)"
    assert "- note: probe layer08: seeds averaged together differ in train.lr" in text
    assert {r.name for r in find_runs(root)} == {"alice/sweep/probe/layer08/seed0", "bob/probe/layer08/seed1"}


def test_seeds_of_different_models_are_refused(tmp_path):
    """Two seeds of one layer's probe read stores of different models: a mean over them would
    mix two experiments, so the report refuses it and names each seed's model."""
    root = tmp_path / "runs"
    for seed, (name, weights) in enumerate([("facebook/wav2vec2-base", "a" * 64), ("facebook/hubert-base-ls960", "b" * 64)]):
        run = write_run(root, "probe", seed, (10.0, 10.0, 20.0, 5.0, 5.0, 10.0), layer=8)
        config = json.loads((run / "config.json").read_text())
        config["data"]["model"] = {"name": name, "revision": None, "weight_hash": weights}
        (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(W2VCacheError, match=r"probe layer08: its seeds were trained on different models \(seed 0: "
                       r"facebook/wav2vec2-base \(weights aaaaaaaaaaaa\); seed 1: facebook/hubert-base-ls960 "
                       r"\(weights bbbbbbbbbbbb\)\); a mean over them means nothing"):
        write_report(root)
    # Two models' sweeps in one tree share their seeds' names: the models are named, not a copy.
    both = tmp_path / "both"
    for prefix, weights in (("base", "a" * 64), ("hubert", "b" * 64)):
        run = write_run(both, "probe", 0, (10.0, 10.0, 20.0, 5.0, 5.0, 10.0), layer=8, prefix=prefix)
        config = json.loads((run / "config.json").read_text())
        config["data"]["model"] = {"name": prefix, "revision": None, "weight_hash": weights}
        (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(W2VCacheError, match=r"different models \(seed 0: base \(weights aaaaaaaaaaaa\); seed 0: hubert"):
        write_report(both)


def test_seeds_trained_on_different_utterances_are_refused(tmp_path):
    """Seed 0 of a probe from one corpus's store, seed 1 from another's (same model): refused,
    each seed's utterances named; seeds recorded before runs named their utterances are averaged."""
    from w2vcache.runs import data_fingerprint

    corpora = [{"train": [("a", "one"), ("b", "two")], "dev": [("c", "three")]},
               {"train": [("a", "one"), ("d", "four"), ("e", "five")], "dev": [("c", "three")]}]
    root = tmp_path / "runs"
    for seed, corpus in enumerate(corpora):
        run = write_run(root, "probe", seed, (10.0, 10.0, 20.0, 5.0, 5.0, 10.0), layer=8)
        config = json.loads((run / "config.json").read_text())
        config["data"]["utterances"] = data_fingerprint(corpus)
        (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(W2VCacheError, match=r"probe layer08: its seeds were trained on different utterances \(seed 0: "
                       r"train 2 \([0-9a-f]{8}\), dev 1 \([0-9a-f]{8}\); seed 1: train 3 .*a mean over them means nothing"):
        write_report(root)
    config = json.loads((run / "config.json").read_text())
    del config["data"]["utterances"]
    (run / "config.json").write_text(json.dumps(config))
    text = write_report(root)["md"].read_text()
    assert markdown_tables(text)["Probes (frozen W2V layer, BiLSTM-CTC)"]["8"]["dev WER"] == "10.00 ± 0.00 (n=2)"
    assert "differ in data" not in text  # one seed recorded before runs named them: nothing to say


def test_user_mistakes_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    (empty / "probe" / "layer08").mkdir(parents=True)
    with pytest.raises(W2VCacheError, match=f"{empty}: no run directories"):
        write_report(empty)
    with pytest.raises(W2VCacheError, match="no such directory"):
        find_runs(tmp_path / "missing")

    waiting = tmp_path / "waiting"
    write_run(waiting, "probe", 0, layer=3, status="unfinished", epochs_done=2)
    with pytest.raises(W2VCacheError, match=r"no finished runs yet: probe/layer03/seed0 \(unfinished, 2 of 10"):
        write_report(waiting)

    broken = tmp_path / "broken"
    run = write_run(broken, "probe", 0, (10.0,) * 6, layer=8)
    (run / "result.json").write_text('{"kind": "probe", ')
    with pytest.raises(W2VCacheError, match=f"{run / 'result.json'}: not valid JSON"):
        find_runs(broken)
    (run / "result.json").write_text(json.dumps({"kind": "probe", "layer": 9, "seed": 0, "status": "finished",
                                                 "dev": {"wer_percent": 10.0, "cer_percent": 10.0}}))
    with pytest.raises(W2VCacheError, match=f"{run}: result.json says layer 9 but config.json says 8"):
        find_runs(broken)

    twice = tmp_path / "twice"
    write_run(twice, "probe", 0, (10.0,) * 6, layer=8)
    write_run(twice, "probe", 0, (10.0,) * 6, layer=8, prefix="copy")
    with pytest.raises(W2VCacheError, match="seed 0 of probe layer08 is also finished in"):
        write_report(twice)


# The command as a user runs it (`w2vcache report`, through the main group) and run on its own.
ENTRY_POINTS = {"w2vcache report": (main, ["report"]), "report alone": (report_command, [])}


@pytest.fixture(params=list(ENTRY_POINTS))
def report_cli(request):
    command, prefix = ENTRY_POINTS[request.param]

    def invoke(*args):
        return runner().invoke(command, [*prefix, *map(str, args)])

    return invoke


def test_cli_prints_the_table_and_the_paths(report_cli, runs, tmp_path):
    result = report_cli(runs)
    assert result.exit_code == 0, result.output
    tables = markdown_tables(result.stdout)
    assert list(tables) == ["Probes (frozen W2V layer, BiLSTM-CTC)", "Fine-tuning (W2V + CTC head, re-initialised blocks)"]
    assert list(tables["Probes (frozen W2V layer, BiLSTM-CTC)"]) == ["0", "4", "8", "12"]
    assert tables["Probes (frozen W2V layer, BiLSTM-CTC)"] == PROBE_TABLE
    assert tables["Fine-tuning (W2V + CTC head, re-initialised blocks)"] == FINETUNE_TABLE
    assert result.stdout.startswith(f"# w2vcache report: {runs}\n")
    assert "Best layer: 8 (lowest mean dev WER, 12.00 %)." in result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("- not included")] == NOT_INCLUDED
    out = runs / "report"
    assert result.stderr.splitlines() == [f"figure: {out / 'report.png'}", f"table: {out / 'report.md'}",
                                          f"table: {out / 'report.csv'}", f"table: {out / 'report.json'}"]
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.json", "report.md", "report.png"]
    assert markdown_tables((out / "report.md").read_text()) == tables  # the file holds the table printed
    assert png_size(out / "report.png") == (1000, 400)

    other = tmp_path / "elsewhere"
    result = report_cli(runs, "--out", other, "--format", "csv", "--format", "json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in other.iterdir()) == ["report.csv", "report.json", "report.png"]
    assert "| 8 | 0,1,2 | 12.00 ± 2.00 (n=3) |" in result.stdout  # the table is printed all the same
    assert [row["layer"] for row in json.loads((other / "report.json").read_text())["rows"][:4]] == [0, 4, 8, 12]

    result = report_cli(runs, "--out", tmp_path / "bare", "--no-figure")
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "bare").iterdir()) == [
        "report.csv", "report.json", "report.md"]


def test_cli_errors_are_one_line(report_cli, tmp_path):
    """A user's mistake: exit code 1 and one `Error: ...` line naming the path, never a traceback."""
    (tmp_path / "empty").mkdir()
    waiting = tmp_path / "waiting"
    write_run(waiting, "probe", 0, layer=3, status="unfinished", epochs_done=2)
    broken = tmp_path / "broken"
    run = write_run(broken, "probe", 0, (10.0,) * 6, layer=8)
    (run / "result.json").write_text('{"kind": "probe", ')
    for runs_dir, message in (
        (tmp_path / "empty", f"Error: {tmp_path / 'empty'}: no run directories (none holds config.json or result.json)"),
        (waiting, f"Error: {waiting}: no finished runs yet: probe/layer03/seed0 (unfinished, 2 of 10"),
        (broken, f"Error: {run / 'result.json'}: not valid JSON"),
    ):
        result = report_cli(runs_dir)
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), result.exception  # handled, not raised
        assert result.stdout == "" and result.stderr.startswith(message), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "empty" / "report").exists() and not (broken / "report").exists()
    result = report_cli(tmp_path / "missing")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = report_cli(tmp_path / "empty", "--format", "xlsx")
    assert result.exit_code == 2 and "xlsx" in result.output


def test_linear_and_weighted_probes_beside_the_bilstm(runs, tmp_path):
    """Linear probes get their own table, weighted probes a row in their kind's table and a column
    of layer weights (those of the best epoch, 7, averaged over seeds); the BiLSTM table and the best
    layer stay as they were. Runs without a probe field are BiLSTM layer probes."""
    linear = {(0, 8): (40.0, 38.0, 60.0, 15.0, 14.0, 25.0), (1, 8): (42.0, 40.0, 62.0, 17.0, 16.0, 27.0),
              (0, 4): (30.0, 29.0, 50.0, 12.0, 11.0, 20.0)}
    for (seed, layer), values in linear.items():
        write_run(runs, "probe", seed, values, layer=layer, name=f"linear-layer{layer:02d}", probe="linear")
    late = {"layer00": 0.9, "layer01": 0.1}  # epoch 10's weights: not the best epoch's, never shown
    write_run(runs, "probe", 0, (9.0, 8.0, 18.0, 2.0, 1.0, 6.0), name="weighted", probe="bilstm",
              weights={7: {"layer00": 0.25, "layer01": 0.75}, 10: late})
    write_run(runs, "probe", 1, (11.0, 10.0, 20.0, 4.0, 3.0, 8.0), name="weighted", probe="bilstm",
              weights={7: {"layer00": 0.35, "layer01": 0.65}, 10: late})
    write_run(runs, "probe", 0, (35.0, 33.0, 55.0, 13.0, 12.0, 22.0), name="linear-weighted", probe="linear",
              weights={7: {"layer00": 0.5, "layer01": 0.5}})
    written = write_report(runs, tmp_path / "out")
    text = written["md"].read_text()
    tables = markdown_tables(text)
    assert list(tables) == ["Probes (frozen W2V layer, BiLSTM-CTC)", "Linear probes (frozen W2V layer, linear-CTC)",
                            "Layer weights of the weighted probes (softmax, at the best epoch)",
                            "Fine-tuning (W2V + CTC head, re-initialised blocks)"]
    bilstm = tables["Probes (frozen W2V layer, BiLSTM-CTC)"]
    assert list(bilstm) == ["0", "4", "8", "12", "weighted"]
    assert {k: v for k, v in bilstm.items() if k != "weighted"} == PROBE_TABLE
    assert bilstm["weighted"]["dev WER"] == "10.00 ± 1.41 (n=2)" and bilstm["weighted"]["test-other CER"] == "7.00 ± 1.41 (n=2)"
    assert tables["Linear probes (frozen W2V layer, linear-CTC)"] == {
        "4": {"seeds": "0", "dev WER": "30.00 (n=1)", "test-clean WER": "29.00 (n=1)", "test-other WER": "50.00 (n=1)",
              "dev CER": "12.00 (n=1)", "test-clean CER": "11.00 (n=1)", "test-other CER": "20.00 (n=1)"},
        "8": {"seeds": "0,1", "dev WER": "41.00 ± 1.41 (n=2)", "test-clean WER": "39.00 ± 1.41 (n=2)",
              "test-other WER": "61.00 ± 1.41 (n=2)", "dev CER": "16.00 ± 1.41 (n=2)",
              "test-clean CER": "15.00 ± 1.41 (n=2)", "test-other CER": "26.00 ± 1.41 (n=2)"},
        "weighted": {"seeds": "0", "dev WER": "35.00 (n=1)", "test-clean WER": "33.00 (n=1)",
                     "test-other WER": "55.00 (n=1)", "dev CER": "13.00 (n=1)", "test-clean CER": "12.00 (n=1)",
                     "test-other CER": "22.00 (n=1)"},
    }
    # 0.25 and 0.35: mean 0.30, sample std 0.1 / sqrt(2) = 0.0707
    assert tables["Layer weights of the weighted probes (softmax, at the best epoch)"] == {
        "layer00": {"BiLSTM weighted": "0.300 ± 0.071 (n=2)", "linear weighted": "0.500 (n=1)"},
        "layer01": {"BiLSTM weighted": "0.700 ± 0.071 (n=2)", "linear weighted": "0.500 (n=1)"},
    }
    assert "Best layer: 8 (lowest mean dev WER, 12.00 %)." in text  # a weighted probe is not a layer
    assert "Best layer for the linear probe: 4 (lowest mean dev WER, 30.00 %)." in text

    report = json.loads(written["json"].read_text())
    assert report["best_layer"]["layer"] == 8 and report["best_linear_layer"] == {
        "layer": 4, "experiment": "linear-layer04", "by": "dev wer"}
    labels = [(r["kind"], r["probe"], r["label"]) for r in report["rows"]]
    assert labels[:8] == [("probe", "bilstm", "0"), ("probe", "bilstm", "4"), ("probe", "bilstm", "8"),
                          ("probe", "bilstm", "12"), ("probe", "bilstm", "weighted"), ("probe", "linear", "4"),
                          ("probe", "linear", "8"), ("probe", "linear", "weighted")]
    weighted = report["rows"][4]
    assert weighted["weighted"] is True and weighted["layer"] is None and weighted["experiment"] == "weighted"
    assert weighted["layer_weights"]["layer01"]["mean"] == pytest.approx(0.7)
    assert report["rows"][0]["layer_weights"] is None and report["rows"][0]["weighted"] is False
    with open(written["csv"], newline="") as f:
        lines = {(r["probe"], r["experiment"]): r for r in csv.DictReader(f)}
    assert float(lines[("linear", "linear-layer08")]["dev_wer_percent_mean"]) == pytest.approx(41.0)
    assert float(lines[("bilstm", "weighted")]["weight_layer00_mean"]) == pytest.approx(0.3)
    assert lines[("bilstm", "weighted")]["weighted"] == "true" and lines[("bilstm", "layer08")]["weighted"] == "false"
    assert lines[("", "reinit-none")]["weighted"] == "" and lines[("bilstm", "layer08")]["weight_layer00_mean"] == ""
    assert png_size(written["png"]) == (1500, 400)  # probes, layer weights, fine-tunes

    old = {r.name: r for r in find_runs(runs)}["probe/layer08/seed0"]  # written as earlier versions did
    assert (old.probe, old.weighted, old.layer, old.key) == ("bilstm", False, 8, (0, 0, 0, 8, ""))


# ---------------------------------------------------------------------------------------------
# Similarity results under RUNS/similarity/ and the note on the frozen CNN


def write_similarity(runs_dir, name, layers, matrix, model_a="tuned", model_b="base", measure="linear_cka"):
    """similarity.json as `w2vcache similarity A [B] --out RUNS/similarity/<name>` writes it (the
    fields the report reads): with `model_b`, two stores of the same layers and their diagonal.
    `measure` None: a file of a version that wrote none (linear CKA, the only measure then)."""
    directory = runs_dir / "similarity" / name
    directory.mkdir(parents=True)
    diagonal = [row[k] for k, row in enumerate(matrix)] if model_b else None
    data = {"measure": measure, "split": "dev", "layers_a": layers, "layers_b": layers, "matrix": matrix,
            "diagonal": diagonal, "frames": 500, "store_a": {"path": "a.zarr", "model": model_a},
            "store_b": {"path": "b.zarr", "model": model_b} if model_b else None}
    if measure is None:
        del data["measure"]
    (directory / "similarity.json").write_text(json.dumps(data))
    return directory


LAYERS = ["layer00", "layer01", "layer02", "layer03"]
# A fine-tuned store against its pre-trained one: layer01 has no variance (null), layer02 changed most.
TUNED = [[0.95, 0.5, 0.3, 0.2], [None, None, None, None], [0.3, 0.4, 0.4, 0.5], [0.2, 0.3, 0.6, 0.7]]
WITHIN = [[1.0, 0.9, 0.8, 0.7], [0.9, 1.0, 0.9, 0.8], [0.8, 0.9, 1.0, 0.9], [0.7, 0.8, 0.9, 1.0]]
SIMILARITY_HEADING = "Layer similarity (linear CKA, `w2vcache similarity`, under similarity/)"


def test_similarity_results_are_reported_with_their_diagonals_and_heatmaps(report_cli, runs):
    from w2vcache.figure import similarity_figure_size
    from w2vcache.report import find_similarities

    write_similarity(runs, "ft-vs-base", LAYERS, TUNED)
    write_similarity(runs / "nested", "ignored", LAYERS, WITHIN)  # only RUNS/similarity/ is read
    write_similarity(runs, "base", LAYERS, WITHIN, model_a="base", model_b=None)
    assert len(find_runs(runs)) == 9 + 3 + 11 + 1  # no similarity result is taken for a run
    result = report_cli(runs)
    assert result.exit_code == 0, result.output
    out = runs / "report"
    text = (out / "report.md").read_text()
    assert markdown_tables(result.stdout)[SIMILARITY_HEADING] == markdown_tables(text)[SIMILARITY_HEADING] == {
        "layer00": {"ft-vs-base": "0.950"}, "layer01": {"ft-vs-base": "-"},
        "layer02": {"ft-vs-base": "0.400"}, "layer03": {"ft-vs-base": "0.700"}}
    assert "- base: linear CKA, within base, split dev, 500 frames, 4 x 4 layers" in text
    assert "- ft-vs-base: linear CKA, tuned against base, split dev, 500 frames, 4 x 4 layers" in text
    assert "Changed most in ft-vs-base: layer02 (linear CKA 0.400 with itself)." in text
    assert "(report-similarity.png)" in text and "(report.png)" in text
    assert f"figure: {out / 'report-similarity.png'}" in result.stderr.splitlines()

    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["similarity"]] == ["base", "ft-vs-base"]
    assert report["similarity"][0]["diagonal"] is None and report["similarity"][0]["changed_most"] is None
    assert report["similarity"][1]["changed_most"] == {"layer": "layer02", "value": 0.4, "cka": 0.4}
    assert report["similarity"][1]["measure"] == "linear_cka"
    assert report["similarity"][1]["matrix"] == TUNED
    # Two heatmaps and one panel of diagonals, each 500 x 450 pixels.
    assert similarity_figure_size(find_similarities(runs)) == (1500, 450)
    assert png_size(out / "report-similarity.png") == (1500, 450)
    assert png_size(out / "report.png") == (1000, 400)  # the runs' figure is unchanged

    result = report_cli(runs, "--out", runs / "bare", "--no-figure")
    assert result.exit_code == 0 and not list((runs / "bare").glob("*.png"))
    assert "Changed most in ft-vs-base" in (runs / "bare" / "report.md").read_text()


def test_similarity_results_of_several_measures_say_which_is_which(tmp_path):
    runs = tmp_path / "runs"
    write_similarity(runs, "cka", LAYERS, TUNED, measure=None)  # written before there were measures
    write_similarity(runs, "pwcca", LAYERS, WITHIN, measure="pwcca")
    text = write_report(runs)["md"].read_text()
    heading = "Layer similarity (linear CKA, PWCCA, `w2vcache similarity`, under similarity/)"
    assert markdown_tables(text)[heading]["layer02"] == {"cka (linear CKA)": "0.400", "pwcca (PWCCA)": "1.000"}
    assert "- pwcca: PWCCA, tuned against base, split dev, 500 frames, 4 x 4 layers" in text
    assert "Changed most in cka: layer02 (linear CKA 0.400 with itself)." in text
    assert "Changed most in pwcca: layer00 (PWCCA 1.000 with itself)." in text


def test_similarity_results_alone_make_a_report(tmp_path):
    runs = tmp_path / "runs"
    write_similarity(runs, "ft-vs-base", LAYERS, TUNED)
    written = write_report(runs)
    assert sorted(written) == ["csv", "json", "md", "similarity_png"]  # no runs: no report.png
    assert SIMILARITY_HEADING in markdown_tables(written["md"].read_text())
    assert json.loads(written["json"].read_text())["rows"] == []


def test_a_broken_similarity_result_is_a_one_line_error(report_cli, runs):
    broken = write_similarity(runs, "broken", LAYERS, TUNED) / "similarity.json"
    broken.write_text('{"split": "dev"}')
    result = report_cli(runs)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"Error: {broken}: not a similarity result of w2vcache similarity")


def test_the_report_says_once_that_fine_tunes_keep_the_cnn_frozen(runs, tmp_path):
    from w2vcache.report import FROZEN_CNN_NOTE

    assert "--train-feature-encoder" in FROZEN_CNN_NOTE  # the option finetune really has
    text = write_report(runs, tmp_path / "frozen")["md"].read_text()
    assert text.count(FROZEN_CNN_NOTE) == 1 and "trained it too:" not in text
    probes = tmp_path / "probes"
    write_probes(probes)
    assert "feature encoder" not in write_report(probes)["md"].read_text()  # no fine-tune, no note
    # A fine-tune that trained the CNN (config.json's model.train_feature_encoder) is named.
    for seed in (0, 1, 2):
        config_path = runs / "finetune" / "reinit-12" / f"seed{seed}" / "config.json"
        config = json.loads(config_path.read_text())
        config["model"]["train_feature_encoder"] = True
        config_path.write_text(json.dumps(config))
    text = write_report(runs, tmp_path / "trained")["md"].read_text()
    assert text.count(FROZEN_CNN_NOTE) == 1 and "These trained it too: reinit-12." in text


def test_without_matplotlib_the_tables_are_written_and_the_figures_asked_for_say_how(runs, tmp_path, monkeypatch):
    import sys

    write_similarity(runs, "ft-vs-base", LAYERS, TUNED)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    written = write_report(runs, tmp_path / "tables", figure=False)
    assert sorted(written) == ["csv", "json", "md"]
    assert SIMILARITY_HEADING in markdown_tables(written["md"].read_text())
    with pytest.raises(W2VCacheError, match="w2vcache\\[plots\\]"):
        write_report(runs, tmp_path / "figures")
    # The command writes the tables and says the figures were not drawn.
    result = runner().invoke(report_command, [str(runs), "--out", str(tmp_path / "command")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "command").iterdir()) == ["report.csv", "report.json", "report.md"]
    assert "figure: not drawn: matplotlib is missing (pip install 'w2vcache[plots]')" in result.stderr


def test_a_probe_record_without_a_probe_kind_is_a_bilstm():
    """Records from before linear probes, or hand-edited to null: the BiLSTM they were."""
    from w2vcache.runs import upgrade_record

    for record in ({"kind": "probe", "layer": 3}, {"kind": "probe", "layer": 3, "probe": None, "weighted": None}):
        upgraded = upgrade_record(record)
        assert upgraded["probe"] == "bilstm" and upgraded["weighted"] is False and upgraded["layer"] == 3
    assert upgrade_record({"kind": "probe", "probe": "linear"})["probe"] == "linear"
    assert "probe" not in upgrade_record({"kind": "finetune", "reinit": [12]})


def test_one_dev_utterance_is_shown_as_each_experiment_decodes_it(tmp_path):
    """From the runs' decoded/dev.tsv: the utterance of median length every run decoded, as the
    lowest finished seed of each experiment wrote it."""
    root = tmp_path / "runs"
    decoded = {  # (kind, layer or reinit, seed) -> id -> (words, edits, hypothesis)
        ("probe", 4, 0): {"a": (2, 1, "hello"), "b": (5, 2, "the cat sat on"), "c": (9, 3, "x")},
        ("probe", 4, 1): {"a": (2, 0, "hello world"), "b": (5, 0, "the cat sat on it"), "c": (9, 0, "y")},
        ("probe", 8, 1): {"b": (5, 1, "the cat sat in it"), "c": (9, 0, "z")},
        ("finetune", (), 0): {"b": (5, 0, "the cat sat on it"), "c": (9, 9, "")},
        ("probe", 12, 0): {"b": (5, 5, "e" * 500), "c": (9, 9, "e")},  # a symbol at every frame
    }
    references = {"a": "hello world", "b": "The cat sat on it.", "c": "nine words of reference text go here now ok"}
    for (kind, what, seed), rows in decoded.items():
        where = dict(layer=what) if kind == "probe" else dict(reinit=what)
        run = write_run(root, kind, seed, (10.0, 10.0, 20.0, 5.0, 5.0, 10.0), **where)
        (run / "decoded").mkdir()
        (run / "decoded" / "dev.tsv").write_text("id\twords\tword_edits\treference\thypothesis\n" + "".join(
            f"{uid}\t{w}\t{e}\t{references[uid]}\t{h}\n" for uid, (w, e, h) in rows.items()))
    written = write_report(root, tmp_path / "out", figure=False)
    text = written["md"].read_text()
    assert "Utterance b (5 words)" in text and "reference: The cat sat on it." in text
    assert markdown_tables(text)["One dev utterance, decoded"] == {
        "BiLSTM 4": {"word edits": "2", "decoded": "the cat sat on"},  # seed 0, the lowest
        "BiLSTM 8": {"word edits": "1", "decoded": "the cat sat in it"},
        "BiLSTM 12": {"word edits": "5", "decoded": "e" * 74 + " ... (500 characters)"},  # 3x the reference, + 20
        "re-init none": {"word edits": "0", "decoded": "the cat sat on it"}}
    example = json.loads(written["json"].read_text())["decoded_example"]
    assert (example["split"], example["id"]) == ("dev", "b") and [d["seed"] for d in example["decoded"]] == [0, 1, 0, 0]
    assert example["decoded"][2]["hypothesis"] == "e" * 500


def test_runs_that_chose_their_best_epoch_on_different_splits_are_pointed_out(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "probe", 0, (10.0, 10.0, 20.0, 5.0, 5.0, 10.0), layer=4)
    run = write_run(root, "probe", 0, (10.0, 10.0, 20.0, 5.0, 5.0, 10.0), layer=8)
    config = json.loads((run / "config.json").read_text())
    config["train"]["dev_split"] = "test-clean"
    (run / "config.json").write_text(json.dumps(config))
    text = write_report(root, tmp_path / "out", figure=False)["md"].read_text()
    assert ("- note: the runs chose their best epochs on different dev splits (dev: 1 run(s), test-clean: 1 run(s))"
            in text)


def test_a_similarity_just_below_one_never_reads_as_one():
    from w2vcache.report import similarity_text

    assert [similarity_text(v) for v in (0.269, 0.99951, 0.99999987, 1.0)] == ["0.269", "0.9995", "0.9999999", "1.000"]
