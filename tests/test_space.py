"""Disk planning: the store's size from the audio headers before anything is written, and the
refusal to start an extraction its file system cannot hold."""

import os

import pytest
from click.testing import CliRunner

from w2vcache import space
from w2vcache.cli import main
from w2vcache.corpus import build_corpus
from w2vcache.extract import ExtractConfig, plan_store

SPLITS = ["--split", "dev=dev-clean", "--split", "test=test-other"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def bytes_under(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_dry_run_writes_nothing_and_predicts_the_store_size(tmp_path, dtype):
    store = tmp_path / "s.zarr"
    result = run_cli("extract", "--dry-run", "--store", store, *SPLITS, "--layers", "0-2", "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert not store.exists() and "s.zarr: needs" in result.output and "free there" in result.output
    planned = plan_store(build_corpus(splits=["dev=dev-clean", "test=test-other"]),
                         ExtractConfig(store=str(store), layers="0-2", dtype=dtype), progress=False)
    assert planned.existing == 0 and planned.needed == planned.bytes
    assert run_cli("extract", "--store", store, *SPLITS, "--layers", "0-2", "--dtype", dtype).exit_code == 0
    # Every feature row is planned exactly; only metadata and records come on top.
    assert planned.bytes <= bytes_under(store) <= 1.05 * planned.bytes
    again = plan_store(build_corpus(splits=["dev=dev-clean", "test=test-other"]),
                       ExtractConfig(store=str(store), layers="0-2", dtype=dtype), progress=False)
    assert again.needed == 0  # a finished store needs nothing more


def test_extraction_refuses_to_start_without_the_space_unless_told(tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    monkeypatch.setattr(space, "_free_bytes", lambda root: 1000)
    result = run_cli("extract", "--store", store, *SPLITS)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "needs" in result.output and "1.0 KB free" in result.output and "--no-space-check" in result.output
    assert not store.exists()
    result = run_cli("extract", "--store", store, *SPLITS, "--no-space-check")
    assert result.exit_code == 0, result.output
    # Finished, it needs nothing more, by its own record of what is done, even where its files
    # are smaller than planned (a run stopped by a full disk after its last block, say).
    monkeypatch.setattr(space, "_bytes_under", lambda root: 0)
    result = run_cli("extract", "--store", store, *SPLITS)
    assert result.exit_code == 0, result.output


def test_sizes_in_words():
    assert [space.human_size(n) for n in (None, 999, 1536, 113 * 10**9)] == ["?", "999 B", "1.5 KB", "113.0 GB"]


def test_a_store_where_this_process_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only mount (or another user's folder): the dry run says so, and extraction stops
    before loading the model or reading audio, naming the folder."""
    folder = tmp_path / "shared"
    folder.mkdir()
    store = folder / "s.zarr"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(folder) and mode == os.W_OK
                        else real_access(path, mode))
    result = run_cli("extract", "--dry-run", "--store", store, *SPLITS)
    assert result.exit_code == 0 and result.output.rstrip().endswith(f"; cannot write in {folder}"), result.output
    result = run_cli("extract", "--store", store, *SPLITS)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: store {store}: cannot write in {folder} (a read-only file system"), result.output
    assert not store.exists()


def test_a_complete_store_on_a_read_only_mount_is_named_complete_when_extracted_again(tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    assert run_cli("extract", "--store", store, *SPLITS, "--layers", "0-1").exit_code == 0
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(store) and mode == os.W_OK
                        else real_access(path, mode))
    result = run_cli("extract", "--store", store, *SPLITS, "--layers", "0-1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot write in {store}" in result.output and "the store there is complete" in result.output, result.output
    # One with a block left to write is refused as before, without the word
    from w2vcache.store import open_store
    opened = open_store(store)
    monkeypatch.setattr(type(opened), "status", lambda self, split, refresh=False: type("S", (), {"complete": False})())
    result = run_cli("extract", "--store", store, *SPLITS, "--layers", "0-1")
    assert result.exit_code == 1 and "the store there is complete" not in result.output, result.output
