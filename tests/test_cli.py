"""The `w2vcache` command group, driven end to end through `w2vcache.cli.main`."""

import importlib.metadata
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from w2vcache import __version__
from w2vcache.cli import main
from w2vcache.corpus import build_corpus, summarize

# Every command the group must offer; one missing from `main` (or a new one not listed here) fails.
COMMANDS = {"corpus", "extract", "info", "verify", "probe", "finetune", "demo", "report", "copy", "pack", "export", "similarity"}


def test_version_is_the_package_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"w2vcache, version {__version__}\n"
    assert __version__ == importlib.metadata.version("w2vcache")  # what pip and the wheel say
    # and the same from the `python -m w2vcache` entry point, in a process of its own
    proc = subprocess.run([sys.executable, "-m", "w2vcache", "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"w2vcache, version {__version__}\n"), proc.stderr


def listed_commands(help_text):
    """The command names of the `Commands:` section of a group's help."""
    section = help_text.split("\nCommands:\n", 1)[1]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.strip()]


def test_every_listed_command_has_working_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: main [OPTIONS] COMMAND [ARGS]...")
    listed = listed_commands(result.output)
    assert set(listed) == COMMANDS and len(listed) == len(COMMANDS)
    for name in listed:
        for flag in ("--help", "-h"):
            sub = CliRunner().invoke(main, [name, flag])
            assert sub.exit_code == 0, (name, flag, sub.output)
            assert sub.output.startswith(f"Usage: main {name} [OPTIONS]"), (name, sub.output)
            first_line = main.commands[name].help.strip().splitlines()[0]
            assert " ".join(first_line.split()[:4]) in " ".join(sub.output.split()), (name, sub.output)
            assert "Options:" in sub.output and "--help" in sub.output and "Traceback" not in sub.output


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(main, ["extrakt"])
    assert result.exit_code == 2 and "No such command 'extrakt'" in result.output


@pytest.fixture(scope="module")
def bundled_summary():
    return summarize(build_corpus())


def test_corpus_json_is_the_library_summary(bundled_summary):
    result = CliRunner().invoke(main, ["corpus", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == bundled_summary
    rows = {r["split"]: r for r in bundled_summary}
    assert list(rows) == ["train", "dev", "test-clean", "test-other"]
    assert rows["dev"]["sources"] == ["dev-clean", "dev-other"]
    assert 0.1 < sum(r["hours"] for r in rows.values()) < 0.25  # 8-10 minutes of audio


def test_corpus_table_shows_the_library_summary(bundled_summary):
    result = CliRunner().invoke(main, ["corpus"])
    assert result.exit_code == 0, result.output
    header, *lines, total = result.output.splitlines()
    assert header.split() == ["split", "utterances", "speakers", "hours", "sources"]
    assert len(lines) == len(bundled_summary)
    for line, row in zip(lines, bundled_summary):
        name, utterances, speakers, hours, sources = line.split(maxsplit=4)
        assert (name, int(utterances), int(speakers), sources.split(", ")) == (
            row["split"], row["utterances"], row["speakers"], row["sources"])
        assert float(hours) == pytest.approx(row["hours"], abs=5e-4)
    name, utterances, hours = total.split()
    assert name == "total" and int(utterances) == sum(r["utterances"] for r in bundled_summary)
    assert float(hours) == pytest.approx(sum(r["hours"] for r in bundled_summary), abs=5e-4)


def test_corpus_of_named_splits():
    """--split picks the sources: here one LibriSpeech split of the bundled corpus per new split."""
    result = CliRunner().invoke(main, ["corpus", "--json", "--split", "a=dev-clean", "--split", "b=test-other"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows == summarize(build_corpus(None, None, ["a=dev-clean", "b=test-other"]))
    assert [(r["split"], r["sources"]) for r in rows] == [("a", ["dev-clean"]), ("b", ["test-other"])]


def test_user_mistakes_are_one_line_errors():
    result = CliRunner().invoke(main, ["corpus", "--split", "dev=dev-clean", "--split", "dev=dev-other"])
    assert result.exit_code == 1
    assert result.output == "Error: split 'dev' is named twice (--split dev=...)\n"


def test_ctrl_c_says_the_work_is_kept_and_how_to_go_on(monkeypatch):
    """click alone prints a bare "Aborted!"."""
    import w2vcache.corpus

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(w2vcache.corpus, "build_corpus", interrupted)
    result = CliRunner().invoke(main, ["corpus"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: interrupted; what was finished is kept: run the same command again "
                                     "to go on from there")


def test_the_readme_shows_the_help_as_it_is():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shown = readme.split("$ w2vcache --help\n", 1)[1].split("```", 1)[0]
    # As a shell 80 columns wide shows it: click wraps help 2 columns short of the terminal.
    assert CliRunner().invoke(main, ["--help"], prog_name="w2vcache", terminal_width=78).output == shown


def test_info_names_a_stores_layers_as_they_are():
    from w2vcache.layers import describe_layers

    base = {f"layer{i:02d}": 768 for i in range(13)}
    assert describe_layers(base) == "13 layers 0-12, dim 768"
    assert describe_layers({k: base[k] for k in ("layer00", "layer04", "layer05", "layer06")}) == "4 layers 0, 4-6, dim 768"
    assert describe_layers({"cnn": 512, **{k: 768 for k in list(base)[:5]}}) == "6 layers cnn (dim 512), 0-4 (dim 768)"
    assert describe_layers({"layer03": 768}) == "1 layer 3, dim 768"
