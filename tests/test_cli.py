import json

from click.testing import CliRunner

from w2vcache import __version__
from w2vcache.cli import main


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "corpus" in result.output


def test_corpus_listing_of_the_bundled_corpus():
    result = CliRunner().invoke(main, ["corpus", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["split"]: r for r in json.loads(result.output)}
    assert set(rows) == {"train", "dev", "test-clean", "test-other"}
    assert rows["dev"]["sources"] == ["dev-clean", "dev-other"]
    assert 0.1 < sum(r["hours"] for r in rows.values()) < 0.25  # 8-10 minutes of audio
    table = CliRunner().invoke(main, ["corpus"])
    assert table.exit_code == 0 and "test-other" in table.output and "total" in table.output


def test_user_mistakes_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(main, ["corpus", "--split", "dev=dev-clean", "--split", "dev=dev-other"])
    assert result.exit_code == 1
    assert "Error: split 'dev' is named twice" in result.output
    assert "Traceback" not in result.output
