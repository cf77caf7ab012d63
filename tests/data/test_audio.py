"""Pre-processing: every bad-input case from the foundation issue, and the normal path."""

import errno

import numpy as np
import pytest

from asd_ray.data.audio import ClipError, integrated_loudness, preprocess_clip, trim_silence


def test_normal_clip_is_loudness_normalised(make_wav, make_tone):
    clip = preprocess_clip(make_wav("a.wav", make_tone()), target_lufs=-23.0, trim=False)
    assert clip.sample_rate == 16_000 and clip.waveform.dtype == np.float32
    assert integrated_loudness(clip.waveform, 16_000) == pytest.approx(-23.0, abs=0.05)
    assert clip.flags == []


@pytest.mark.parametrize("rate", [8_000, 48_000, 44_100])
def test_other_rates_are_resampled_and_flagged(make_wav, make_tone, rate):
    clip = preprocess_clip(make_wav("r.wav", make_tone(rate=rate), rate=rate), trim=False)
    assert len(clip.waveform) == 32_000
    assert f"resampled:{rate}Hz" in clip.flags


def test_eight_channels_are_downmixed(make_wav, make_tone):
    clip = preprocess_clip(make_wav("c8.wav", make_tone(channels=8)), trim=False)
    assert clip.waveform.ndim == 1 and len(clip.waveform) == 32_000
    assert "downmixed:8ch" in clip.flags


def _near_far(seconds=4.0, rate=16_000):
    """A near/far pair as DCASE 2026 records it: the machine (a 1 kHz tone) loud at the near microphone and faint at
    the far one, factory noise reaching both through other short responses (a delay and a gain each)."""
    rng = np.random.default_rng(0)
    n = int(seconds * rate)
    machine = 0.1 * np.sin(2 * np.pi * 1000 * np.arange(n) / rate)
    noise = 0.1 * rng.standard_normal(n + 64)
    near_noise, far_noise = 0.8 * noise[40:40 + n], noise[52:52 + n] + 0.5 * noise[50:50 + n]
    return machine, near_noise, np.stack([machine + near_noise, 0.05 * machine + far_noise], axis=1)


def test_a_near_far_pair_gives_the_channel_asked_for(make_wav):
    machine, near_noise, pair = _near_far()
    path = make_wav("pair.wav", pair, subtype="FLOAT")
    keep = dict(trim=False, loudness_normalise=False)
    near, far, mix = (preprocess_clip(path, channels=c, **keep) for c in ("near", "far", "mix"))
    np.testing.assert_allclose(near.waveform, pair[:, 0], atol=1e-6)
    np.testing.assert_allclose(far.waveform, pair[:, 1], atol=1e-6)
    np.testing.assert_allclose(mix.waveform, pair.mean(axis=1), atol=1e-6)
    assert (near.flags, far.flags, mix.flags) == (["channel:near"], ["channel:far"], ["downmixed:2ch"])
    tone = make_wav("mono.wav", machine)  # a mono clip is what it is, whatever the setting
    assert all(preprocess_clip(tone, channels=c, **keep).flags == [] for c in ("near", "far", "mix", "cancel", "subtract"))
    with pytest.raises(ValueError, match="preprocess.channels 'left'"):
        preprocess_clip(path, channels="left")


def test_cancelling_the_far_channel_removes_the_noise_both_hear_and_keeps_the_machine(make_wav):
    machine, near_noise, pair = _near_far()
    clip = preprocess_clip(make_wav("pair.wav", pair, subtype="FLOAT"), channels="cancel", trim=False,
                           loudness_normalise=False)
    assert clip.flags == ["cancelled:far"] and len(clip.waveform) == len(machine)
    middle = slice(2048, -2048)  # away from the STFT's edges
    left = clip.waveform[middle] - machine[middle]
    noise_db = 10 * np.log10(np.mean(near_noise[middle] ** 2) / np.mean(left ** 2))
    assert noise_db > 10, noise_db  # the shared noise is mostly gone (12.8 dB here) ...
    kept = np.dot(clip.waveform[middle], machine[middle]) / np.dot(machine[middle], machine[middle])
    assert 0.9 < kept < 1.05, kept  # ... the machine, which the far microphone hardly hears, stays
    # a pair shorter than one STFT frame is rejected as too short, naming the file (it raised scipy's ValueError)
    short = make_wav("short.wav", pair[:40], subtype="FLOAT")
    with pytest.raises(ClipError, match="too short") as info:
        preprocess_clip(short, channels="cancel")
    assert info.value.path == str(short)


def test_spectral_subtraction_removes_noise_the_microphones_hear_incoherently_which_cancelling_cannot(make_wav):
    """In a reverberant hall the noise at the two microphones has one spectrum but no fixed phase relation: the
    complex cancellation finds nothing to remove, the magnitude subtraction removes most of it and keeps the tone."""
    rate, n = 16_000, 4 * 16_000
    rng = np.random.default_rng(1)
    machine = 0.1 * np.sin(2 * np.pi * 1000 * np.arange(n) / rate)
    near_noise, far_noise = 0.05 * rng.standard_normal(n), 0.1 * rng.standard_normal(n)  # independent draws
    pair = np.stack([machine + near_noise, 0.05 * machine + far_noise], axis=1)
    path = make_wav("hall.wav", pair, subtype="FLOAT")
    keep = dict(trim=False, loudness_normalise=False)
    out = {c: preprocess_clip(path, channels=c, **keep) for c in ("cancel", "subtract")}
    assert out["subtract"].flags == ["subtracted:far"] and len(out["subtract"].waveform) == n

    def band_db(x, lo, hi):  # mean power (dB) of x's spectrum between lo and hi Hz, away from the STFT's edges
        spec = np.abs(np.fft.rfft(x[2048:-2048])) ** 2
        f = np.fft.rfftfreq(n - 4096, 1 / rate)
        return 10 * np.log10(spec[(f >= lo) & (f < hi)].mean())

    noise_before = band_db(pair[:, 0], 2000, 7000)  # no machine there: only the near microphone's noise
    removed = {c: noise_before - band_db(clip.waveform, 2000, 7000) for c, clip in out.items()}
    assert removed["cancel"] < 1.0 and removed["subtract"] > 4.0, removed  # 0.05 and 6.1 dB here
    tone = {c: band_db(clip.waveform, 990, 1010) - band_db(pair[:, 0], 990, 1010) for c, clip in out.items()}
    assert abs(tone["subtract"]) < 1.0, tone  # the machine stays


def test_all_zero_clip_is_flagged_silent_not_divided_by_zero(make_wav):
    clip = preprocess_clip(make_wav("z.wav", np.zeros(32_000)))
    assert "silent" in clip.flags and clip.loudness == -np.inf
    assert np.isfinite(clip.waveform).all() and not clip.waveform.any()


def _error(path, **kw):
    with pytest.raises(ClipError) as info:
        preprocess_clip(path, **kw)
    assert str(path) in str(info.value) and info.value.path == str(path)
    return info.value.reason


def test_corrupt_file(tmp_path):
    p = tmp_path / "corrupt.wav"
    p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio at all" * 10)
    assert "cannot decode" in _error(p)


def test_not_audio_at_all(tmp_path):
    p = tmp_path / "text.wav"
    p.write_text("hello")
    assert "cannot decode" in _error(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    assert "cannot decode" in _error(p)


def test_wav_with_no_samples(make_wav):
    assert "empty" in _error(make_wav("nosamples.wav", np.zeros(0)))


def test_truncated_header(make_wav, make_tone):
    p = make_wav("trunc.wav", make_tone())
    p.write_bytes(p.read_bytes()[:30])
    assert "cannot decode" in _error(p)


def test_nan_and_inf_samples(make_wav, make_tone):
    x = make_tone().astype(np.float32)
    x[100], x[200] = np.nan, np.inf
    assert "NaN/Inf" in _error(make_wav("nan.wav", x, subtype="FLOAT"))


def test_shorter_than_loudness_block(make_wav, make_tone):
    assert "too short" in _error(make_wav("short.wav", make_tone(seconds=0.3)), min_seconds=0.0)


def test_shorter_than_minimum_length(make_wav, make_tone):
    assert "too short" in _error(make_wav("short1.wav", make_tone(seconds=0.8)), min_seconds=1.0)


def test_missing_file(tmp_path):
    assert _error(tmp_path / "missing.wav") == f"file not found: {tmp_path / 'missing.wav'}"


def test_a_clip_that_cannot_be_opened_for_lack_of_permission_says_so(make_wav, make_tone, monkeypatch):
    """Tests run as root, whom chmod 000 does not stop: the open that the decoder does itself is refused instead,
    as the kernel refuses it to another user (libsndfile, opening the file itself, said only "System error.")."""
    from asd_ray.data import audio

    locked, free = make_wav("locked.wav", make_tone()), make_wav("free.wav", make_tone())

    def refuse(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(audio, "open", refuse, raising=False)
    assert _error(locked) == f"permission denied: {locked}"
    assert audio.try_preprocess(str(locked)) == (None, f"permission denied: {locked}")
    assert audio.try_preprocess(str(free))[1] == ""


def test_a_directory_is_not_decoded(tmp_path):
    (tmp_path / "dir.wav").mkdir()
    assert _error(tmp_path / "dir.wav") == f"a directory, not a sound file: {tmp_path / 'dir.wav'}"


def test_decode_errors_name_no_file_object(tmp_path):
    p = tmp_path / "text.wav"
    p.write_text("hello")
    assert _error(p) == "cannot decode: Format not recognised."


def test_trim_removes_silent_ends_but_keeps_minimum():
    rate = 16_000
    loud = 0.1 * np.sin(np.arange(rate * 2) * 0.1)
    x = np.concatenate([np.zeros(rate), loud, np.zeros(rate)]).astype(np.float32)
    y = trim_silence(x, rate=rate, top_db=60, frame=1024, min_seconds=1.0)
    assert 2 * rate <= len(y) <= 2 * rate + 2048
    short = np.concatenate([np.zeros(rate * 2), loud[:1024], np.zeros(rate * 2)]).astype(np.float32)
    assert len(trim_silence(short, rate=rate, min_seconds=1.5)) == int(1.5 * rate)


def test_max_seconds_cuts(make_wav, make_tone):
    clip = preprocess_clip(make_wav("long.wav", make_tone(seconds=3.0)), max_seconds=2.0, trim=False)
    assert len(clip.waveform) == 32_000 and "cut" in clip.flags


def test_a_sound_files_bytes_preprocess_like_its_path(make_wav, make_tone):
    path = make_wav("clip.wav", make_tone(seconds=2.0, rate=22_050), rate=22_050)
    from_path, from_bytes = preprocess_clip(path), preprocess_clip(path.read_bytes())
    np.testing.assert_array_equal(from_bytes.waveform, from_path.waveform)
    assert from_bytes.flags == from_path.flags
    with pytest.raises(ClipError, match=r"audio body \(5 bytes\): cannot decode"):
        preprocess_clip(b"RIFF!")
    with pytest.raises(ClipError, match=r"audio body \(0 bytes\): cannot decode"):
        preprocess_clip(b"")


def _long_flac(seconds: float, rate: int = 16_000, channels: int = 1) -> bytes:
    """A FLAC of ``seconds`` of silence, written in blocks: a few kB however long."""
    import io

    import soundfile as sf

    out = io.BytesIO()
    with sf.SoundFile(out, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((rate * 10, channels), np.int16)
        for _ in range(int(seconds // 10)):
            f.write(block)
    return out.getvalue()


def test_a_decode_limit_refuses_long_files_before_decoding_them():
    """30 minutes of FLAC (a few kB; 115 MB as float32) under a 60 s limit: refused, and the reader never holds
    more than the limit's samples (tracemalloc sees numpy's buffers); under the limit the file decodes whole."""
    import tracemalloc

    body = _long_flac(1800)
    assert len(body) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ClipError, match=r"more than the decode limit of 60 s \(960000 frames at 16000 Hz"):
            preprocess_clip(body, decode_limit_s=60.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # 60 s of 16 kHz float32 is 3.8 MB
    eight = _long_flac(40, channels=8)  # 8 channels at 16 kHz: the whole limit's worth of samples per second
    assert len(preprocess_clip(eight, decode_limit_s=40.0, trim=False).waveform) == 40 * 16_000
    with pytest.raises(ClipError, match="more than the decode limit of 30 s"):
        preprocess_clip(_long_flac(40, rate=48_000, channels=8), decode_limit_s=30.0)  # 3 x the samples/s
    assert len(preprocess_clip(_long_flac(50), trim=False).waveform) == 50 * 16_000  # no limit by default


def test_a_decode_limit_holds_for_a_stream_of_unknown_length():
    """A FLAC whose header gives no length (libsndfile then reports 2**63 - 1 frames) is read no further than
    the limit, and refused. (Without a limit, reading it whole fails: soundfile allocates the frames its
    header claims, and libsndfile cannot seek to the end of such a stream.)"""
    flac = bytearray(_long_flac(20))
    streaminfo_total = slice(8 + 13, 8 + 18)  # the 36 low bits of these 5 bytes: total samples, 0 = unknown
    flac[streaminfo_total] = (int.from_bytes(flac[streaminfo_total], "big") & ~(2**36 - 1)).to_bytes(5, "big")
    with pytest.raises(ClipError, match="more than the decode limit of 10 s .*: more frames than that follow"):
        preprocess_clip(bytes(flac), decode_limit_s=10.0)


def test_decode_errors_name_the_body_not_a_python_object():
    with pytest.raises(ClipError) as info:
        preprocess_clip(b"RIFF....WAVEjunk")
    assert "object at 0x" not in str(info.value) and "BytesIO" not in str(info.value), str(info.value)
    assert str(info.value).startswith("audio body (16 bytes): cannot decode: ")
