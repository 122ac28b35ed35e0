"""Audio decode (PyAV, any container) and encode (the six response formats, whole and streamed)."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from earshot.audio.decode import AudioDecodeError, AudioTooLong, decode_audio
from earshot.audio.encode import CONTENT_TYPES, FORMATS, PCM_SAMPLE_RATE, StreamEncoder, encode_audio

JFK_SECONDS = 11.0


@pytest.fixture(scope="module")
def jfk_samples(jfk_flac: Path) -> np.ndarray:
    """jfk.flac as int16 mono 16 kHz, made with PyAV's resampler directly (not by the code under test).

    (The file itself is 44.1 kHz stereo FLAC with 24-bit samples, whatever its name suggests.)"""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    frames = []
    with av.open(str(jfk_flac)) as c:
        for frame in c.decode(audio=0):
            frames += resampler.resample(frame)
    frames += resampler.resample(None)
    samples = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert samples.dtype == np.int16
    assert len(samples) == int(JFK_SECONDS * 16000)
    return samples


def _encode_with_pyav(
    samples: np.ndarray,
    rate: int,
    *,
    container: str,
    codec: str,
    out_rate: int,
    right: np.ndarray | None = None,
) -> bytes:
    """Test inputs are made with PyAV itself, independently of earshot.audio.encode. int16 samples;
    with `right`, a stereo file whose left channel is `samples`."""
    buf = io.BytesIO()
    layout = "mono" if right is None else "stereo"
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=out_rate)
        stream.layout = layout
        channels = [samples] if right is None else [samples, right]
        planes = np.stack([c.astype(np.float32) / 32768.0 for c in channels])
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes), format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _probe(data: bytes) -> tuple[str, int, float]:
    """(container, sample rate, seconds) of encoded bytes, decoded by PyAV."""
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        n = sum(f.samples for f in c.decode(stream))
        return c.format.name, stream.rate, n / stream.rate


# (container, codec, encoder rate): what clients send
INPUTS = {
    "flac": ("flac", "flac", 16000),
    "wav": ("wav", "pcm_s16le", 16000),
    "mp3": ("mp3", "libmp3lame", 16000),
    "ogg-opus": ("ogg", "libopus", 48000),
    "m4a": ("ipod", "aac", 16000),
    "webm": ("webm", "libopus", 48000),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_decodes_each_container_to_16k_mono_of_the_right_length(jfk_samples: np.ndarray, name: str) -> None:
    container, codec, rate = INPUTS[name]
    data = _encode_with_pyav(jfk_samples, 16000, container=container, codec=codec, out_rate=rate)
    out = decode_audio(data)
    assert out.dtype == np.float32
    assert out.ndim == 1
    # lossy codecs add encoder delay/padding (opus 312 samples at 48k, aac 1024, mp3 ~1100)
    assert abs(len(out) / 16000 - JFK_SECONDS) < 0.1, len(out) / 16000
    assert float(np.max(np.abs(out))) <= 1.0
    # it is the same audio: its loudness envelope follows the source's (codecs shift it by < 100 ms)
    assert _envelope_match(out, jfk_samples.astype(np.float32) / 32768.0) > 0.95


def _envelope_match(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation of 10 ms RMS envelopes within +-150 ms of lag."""

    def env(x: np.ndarray) -> np.ndarray:
        n = len(x) // 160
        return np.sqrt(np.mean(x[: n * 160].reshape(n, 160) ** 2, axis=1))

    ea, eb = env(a), env(b)
    n = min(len(ea), len(eb)) - 20
    return max(float(np.corrcoef(ea[lag : lag + n], eb[:n])[0, 1]) for lag in range(0, 16))


def test_decodes_a_24_bit_44k_stereo_flac_file(jfk_flac: Path, jfk_samples: np.ndarray) -> None:
    with av.open(str(jfk_flac)) as c:
        assert (c.streams.audio[0].rate, c.streams.audio[0].channels) == (44100, 2)
    out = decode_audio(jfk_flac)  # a pathlib.Path (server-side file)
    assert len(out) == len(jfk_samples)
    np.testing.assert_allclose(out, jfk_samples / 32768.0, atol=2e-3)


def test_wav_decodes_sample_exact(jfk_samples: np.ndarray) -> None:
    wav = _encode_with_pyav(jfk_samples, 16000, container="wav", codec="pcm_s16le", out_rate=16000)
    out = decode_audio(io.BytesIO(wav))  # a file object
    assert len(out) == len(jfk_samples)
    np.testing.assert_allclose(out, jfk_samples / 32768.0, atol=1e-6)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))


@pytest.mark.parametrize(("right", "gain"), [("same", 1.0), ("silent", 0.5)])
def test_stereo_44k_is_mixed_down_and_resampled(jfk_samples: np.ndarray, right: str, gain: float) -> None:
    # upsample to 44.1 kHz with PyAV, write stereo, expect the mean of the channels at 16 kHz mono
    resampler = av.AudioResampler(format="s16", layout="mono", rate=44100)
    frame = av.AudioFrame.from_ndarray(jfk_samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 16000
    up = np.concatenate(
        [f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)]
    )
    other = up if right == "same" else np.zeros_like(up)
    data = _encode_with_pyav(up, 44100, container="wav", codec="pcm_s16le", out_rate=44100, right=other)
    with av.open(io.BytesIO(data)) as c:
        assert c.streams.audio[0].channels == 2
        assert c.streams.audio[0].rate == 44100
    out = decode_audio(data)
    assert abs(len(out) / 16000 - JFK_SECONDS) < 0.01
    ref = jfk_samples.astype(np.float32) / 32768.0
    assert float(np.corrcoef(out[:160000], ref[:160000])[0, 1]) > 0.99
    assert _rms(out) == pytest.approx(gain * _rms(ref), rel=0.03)


def test_other_sample_rate_requested(jfk_flac: Path) -> None:
    out = decode_audio(jfk_flac, sample_rate=24000)
    assert abs(len(out) - JFK_SECONDS * 24000) < 48


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty", b""),
        ("random", np.random.default_rng(7).bytes(20000)),
        ("text", b"this is not audio at all\n" * 50),
    ],
)
def test_garbage_is_a_decode_error(name: str, data: bytes) -> None:
    with pytest.raises(AudioDecodeError, match=r"^could not decode audio: "):
        decode_audio(data)


def test_truncated_flac_header_is_a_decode_error(jfk_flac: Path) -> None:
    head = jfk_flac.read_bytes()[:30]  # "fLaC" and a cut STREAMINFO block
    assert head.startswith(b"fLaC")
    with pytest.raises(AudioDecodeError, match="could not decode audio"):
        decode_audio(head)


def test_zero_sample_wav_is_a_decode_error() -> None:
    wav = struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", 36, b"WAVE", b"fmt ", 16, 1, 1, 16000, 32000, 2, 16, b"data", 0
    )
    with av.open(io.BytesIO(wav)) as c:  # a valid, empty wav
        assert c.streams.audio
    with pytest.raises(AudioDecodeError, match="no audio samples"):
        decode_audio(wav)


def test_no_audio_stream_is_a_decode_error() -> None:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioDecodeError, match="no audio stream"):
        decode_audio(buf.getvalue())


def test_header_claiming_ten_hours_decodes_what_is_there_without_allocating_for_it() -> None:
    one_second = (np.sin(np.arange(16000) / 10) * 10000).astype("<i2").tobytes()
    claimed = 10 * 3600 * 16000 * 2  # 10 h of 16-bit mono = 1.15 GB
    wav = (
        struct.pack(
            "<4sI4s4sIHHIIHH4sI",
            b"RIFF",
            36 + claimed,
            b"WAVE",
            b"fmt ",
            16,
            1,
            1,
            16000,
            32000,
            2,
            16,
            b"data",
            claimed,
        )
        + one_second
    )
    tracemalloc.start()  # numpy reports its buffers to tracemalloc, touched or not
    try:
        out = decode_audio(wav)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) == 16000
    assert peak < 20 * 2**20, f"peak traced allocation {peak} bytes"


def test_max_seconds_stops_decoding(jfk_flac: Path) -> None:
    with pytest.raises(AudioTooLong, match="longer than the limit of 5 seconds") as info:
        decode_audio(jfk_flac.read_bytes(), max_seconds=5)
    assert info.value.max_seconds == 5
    assert len(decode_audio(jfk_flac.read_bytes(), max_seconds=11.5)) == 176000


def test_max_seconds_stops_before_reading_the_rest() -> None:
    """A stream that would decode forever is cut at the limit (decoding stops, nothing accumulates)."""

    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            header = struct.pack(
                "<4sI4s4sIHHIIHH4sI",
                b"RIFF",
                0xFFFFFFFF,
                b"WAVE",
                b"fmt ",
                16,
                1,
                1,
                16000,
                32000,
                2,
                16,
                b"data",
                0xFFFFFFFF,
            )
            self.pending = header
            self.served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            chunk = self.pending or bytes(len(b))
            n = min(len(b), len(chunk))
            b[:n] = chunk[:n]
            self.pending = self.pending[n:]
            self.served += n
            return n

    endless = Endless()
    with pytest.raises(AudioTooLong):
        decode_audio(endless, max_seconds=2)  # type: ignore[arg-type]
    assert endless.served < 16000 * 2 * 10  # read about the limit, not a 4 GB "data" chunk


def test_a_str_is_never_taken_for_a_path(jfk_flac: Path) -> None:
    with pytest.raises(TypeError):
        decode_audio(str(jfk_flac))  # type: ignore[arg-type]


def test_input_that_references_other_files_is_refused(
    jfk_flac: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(jfk_flac.parent)
    for entry in (jfk_flac.name, str(jfk_flac)):
        concat = f"ffconcat version 1.0\nfile '{entry}'\n".encode()
        with pytest.raises(AudioDecodeError):
            decode_audio(concat)
        playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:11\n#EXTINF:11,\n{entry}\n#EXT-X-ENDLIST\n".encode()
        with pytest.raises(AudioDecodeError):
            decode_audio(playlist)


# --------------------------------------------------------------------------- encode

TONE_RATE = 24000
TONE = (0.4 * np.sin(2 * np.pi * 330 * np.arange(int(TONE_RATE * 2.5)) / TONE_RATE)).astype(np.float32)
# codec padding allowance in seconds: mp3 (encoder delay + last frame), aac (priming + last frame)
PADDING = {"mp3": 0.12, "aac": 0.11, "opus": 0.03, "flac": 0.0, "wav": 0.0}
EXPECTED = {
    "mp3": ("mp3", 24000),
    "opus": ("ogg", 48000),
    "aac": ("aac", 24000),
    "flac": ("flac", 24000),
    "wav": ("wav", 24000),
}


def test_formats_and_content_types() -> None:
    assert set(FORMATS) == {"mp3", "opus", "aac", "flac", "wav", "pcm"}
    assert CONTENT_TYPES == {
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }
    with pytest.raises(ValueError, match="unsupported audio format"):
        encode_audio(TONE, TONE_RATE, "ogg")


@pytest.mark.parametrize("fmt", list(EXPECTED))
def test_encode_decodes_back_with_the_right_duration_and_rate(fmt: str) -> None:
    data = encode_audio(TONE, TONE_RATE, fmt)
    container, rate, seconds = _probe(data)
    assert (container, rate) == EXPECTED[fmt]
    assert 2.5 - 0.05 <= seconds <= 2.5 + 0.05 + PADDING[fmt], seconds
    back = decode_audio(data, sample_rate=TONE_RATE)
    # the tone survives: dominant frequency 330 Hz
    spectrum = np.abs(np.fft.rfft(back[: TONE_RATE * 2]))
    assert abs(np.argmax(spectrum) / 2 - 330) < 2


def test_wav_is_16_bit_with_an_exact_header() -> None:
    data = encode_audio(TONE, TONE_RATE, "wav")
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WAVE"
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    assert struct.unpack_from("<H", data, 34)[0] == 16
    assert struct.unpack_from("<I", data, 40)[0] == len(TONE) * 2


def test_pcm_is_raw_16_bit_le_at_24k() -> None:
    data = encode_audio(TONE, TONE_RATE, "pcm")
    assert len(data) == len(TONE) * 2
    pcm = np.frombuffer(data, "<i2")
    np.testing.assert_allclose(pcm / 32767, TONE, atol=1 / 32767)
    # other rates are resampled to 24 kHz, as OpenAI documents pcm
    tone16 = (0.4 * np.sin(2 * np.pi * 330 * np.arange(16000) / 16000)).astype(np.float32)
    data16 = encode_audio(tone16, 16000, "pcm")
    assert abs(len(data16) / 2 - PCM_SAMPLE_RATE) < 64


def test_samples_are_clipped_not_wrapped() -> None:
    loud = np.array([2.0, -2.0, 0.5], np.float32)
    pcm = np.frombuffer(encode_audio(loud, TONE_RATE, "pcm"), "<i2")
    assert list(pcm) == [32767, -32767, 16384]


@pytest.mark.parametrize("fmt", [*EXPECTED, "pcm"])
def test_stream_encoder_pieces_concatenate_to_the_full_clip(fmt: str) -> None:
    encoder = StreamEncoder(fmt, TONE_RATE)
    pieces = [encoder.write(TONE[i : i + 9000]) for i in range(0, len(TONE), 9000)]
    pieces.append(encoder.close())
    assert encoder.close() == b""
    data = b"".join(pieces)
    if fmt == "pcm":
        assert len(data) == len(TONE) * 2
        return
    # bytes come out as audio is written, not only at close
    assert sum(len(p) for p in pieces[:-1]) > len(data) / 2
    container, rate, seconds = _probe(data)
    assert (container, rate) == EXPECTED[fmt]
    assert 2.5 - 0.05 <= seconds <= 2.5 + 0.05 + PADDING[fmt], seconds
    with pytest.raises(ValueError, match="closed"):
        encoder.write(TONE)


def test_streamed_wav_header_claims_unknown_length_and_still_decodes() -> None:
    encoder = StreamEncoder("wav", TONE_RATE)
    first = encoder.write(TONE[:100])
    assert struct.unpack_from("<I", first, 40)[0] == 0xFFFFFFFF
    data = first + encoder.write(TONE[100:]) + encoder.close()
    assert len(decode_audio(data, sample_rate=TONE_RATE)) == len(TONE)


def test_stream_encoder_of_many_tiny_writes() -> None:
    encoder = StreamEncoder("opus", TONE_RATE)
    data = b"".join(encoder.write(TONE[i : i + 100]) for i in range(0, len(TONE), 100)) + encoder.close()
    assert abs(_probe(data)[2] - 2.5) < 0.05


def test_encode_rejects_non_mono() -> None:
    with pytest.raises(ValueError, match="mono"):
        encode_audio(np.zeros((2, 100), np.float32), TONE_RATE, "wav")


def test_no_temp_files_are_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for fmt in FORMATS:
        encode_audio(TONE, TONE_RATE, fmt)
    decode_audio(encode_audio(TONE, TONE_RATE, "flac"))
    assert os.listdir(tmp_path) == []
