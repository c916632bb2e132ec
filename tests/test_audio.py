import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from conftest import write_wave
from w2vcache.audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from w2vcache.checkpoints import load_backbone


def test_loads_16k_mono_as_float32(tmp_path):
    path = write_wave(tmp_path / "ok.flac", seconds=0.3)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == int(0.3 * SAMPLE_RATE)
    ref, _ = sf.read(path, dtype="float32")
    np.testing.assert_array_equal(x, ref)
    assert audio_info(path).seconds == pytest.approx(0.3)


def test_wrong_rate_names_the_rate_and_the_fix(tmp_path):
    path = write_wave(tmp_path / "narrow.flac", rate=8000)
    with pytest.raises(AudioError, match=r"narrow\.flac.*8000 Hz.*16000.*sox") as err:
        load_audio(path)
    assert err.value.path == str(path)


def test_one_sox_command_fixes_rate_and_channels_at_once(tmp_path):
    path = write_wave(tmp_path / "both.wav", rate=22050, channels=2)
    with pytest.raises(AudioError, match=r"22050 Hz and has 2 channels") as err:
        load_audio(path)
    command = re.search(r"`(sox [^`]+)`", str(err.value))[1]
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed; the command is checked where it is")
    subprocess.run(command.split(), cwd=tmp_path, check=True)
    fixed = load_audio(tmp_path / "out.flac")
    assert len(fixed) == pytest.approx(0.5 * SAMPLE_RATE, abs=2)


def test_stereo_is_refused(tmp_path):
    path = write_wave(tmp_path / "stereo.flac", channels=2)
    with pytest.raises(AudioError, match=r"stereo\.flac.*2 channels.*mono"):
        load_audio(path)


def test_too_short_for_one_frame(tmp_path):
    # The minimum is the model's receptive field, derived from its convolutions: 400 samples for W2V.
    field = load_backbone("builtin:tiny").receptive_field
    assert field == 400
    path = write_wave(tmp_path / "tiny.flac", seconds=200 / SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"tiny\.flac.*200 samples.*400"):
        load_audio(path, field)
    # exactly one receptive field is enough
    assert len(load_audio(write_wave(tmp_path / "ok.flac", seconds=field / SAMPLE_RATE), field)) == field


def test_truncated_flac(tmp_path):
    path = write_wave(tmp_path / "full.flac", seconds=2.0)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(AudioError, match=r"cut\.flac.*(truncated|corrupt)"):
        load_audio(cut)


def test_not_audio_and_missing(tmp_path):
    junk = tmp_path / "junk.flac"
    junk.write_text("this is not audio")
    with pytest.raises(AudioError, match=r"junk\.flac.*not a readable audio file"):
        load_audio(junk)
    with pytest.raises(AudioError, match=r"nope\.flac.*not found"):
        load_audio(tmp_path / "nope.flac")


def test_third_party_bad_files(shared_fixtures):
    field = load_backbone("builtin:tiny").receptive_field  # W2V needs 400 samples for one frame
    bad = shared_fixtures / "bad-audio"
    expectations = {
        "stereo.flac": "2 channels",
        "tiny200.flac": "200 samples",
        "truncated.flac": "truncated|corrupt",
        "notaudio.flac": "not a readable audio file",
        "lhotse__LJ002-0020_22050.wav": "22050 Hz",
        "speechbrain__speech_-0.98894_0_0.14834.flac": "4 channels",
        "python-soundfile__mono.raw": "headerless raw",
        "scipy__test-8000Hz-le-3ch-5S-36bit.wav": "not a readable audio file",
        "scipy__test-44100Hz-le-1ch-4bytes-incomplete-chunk.wav": "not a readable audio file",
    }
    for name, reason in expectations.items():
        with pytest.raises(AudioError, match=reason):
            load_audio(bad / name, field)
    # every other file either loads as 16 kHz mono or is refused with the file's name
    for path in sorted(bad.iterdir()):
        try:
            x = load_audio(path, field)
            assert x.dtype == np.float32 and len(x) >= field
        except AudioError as err:
            assert path.name in str(err)
