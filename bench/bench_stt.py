"""1. Warm STT overhead: the API against faster-whisper called directly, in one run, interleaved."""

from __future__ import annotations

import time

from bench import direct
from bench.common import (
    JFK,
    STT_MODEL,
    BenchResult,
    Context,
    Row,
    earshot_server,
    histogram_mean,
    load_model,
    log,
    median,
    median_ratio_row,
    quiesce,
    scrape,
    summary,
    transcribe,
)

NAME = "stt"
TITLE = "Warm STT overhead (tiny.en, jfk.flac, json)"
TARGET = 1.05
METHOD = f"""\
earshot: wall time of one `POST /v1/audio/transcriptions` (model {STT_MODEL}, response_format json,
multipart upload of jfk.flac's bytes read once) from an httpx client with a kept-alive connection, to
the body read and parsed; the model is loaded and warm. The server decodes the upload (PyAV), runs
faster-whisper in a worker thread and answers JSON.
direct: wall time, in the benchmark process, of decoding jfk.flac from the file (earshot's PyAV
decoder, the one the API runs on the upload, so both sides transcribe identical samples and do the
same decoding work) plus `WhisperModel.transcribe(samples, ...)`, every segment drained and the text
joined. The model is built with WhisperBackend's own defaults (device auto, compute_type auto,
cpu_threads 0, num_workers 1; the resolved compute type is recorded) and transcribed with the
options the API passes (beam_size 5, temperature fallback 0.0..1.0, no language, no prompt, no VAD,
no word timestamps). The report says whether both sides produced the same text.
Both warm (a few untimed calls each first); timed calls alternate earshot/direct, the order flipped
each iteration; medians. Ratio = earshot median / direct median. The server's own inference time
(earshot_inference_duration_seconds, sum/count over the timed calls) splits earshot's time into
inference and everything around it. On the side, earshot's decoder is timed against faster-whisper's
own (`decode_audio(path)`, what `transcribe("jfk.flac")` would use): that difference is not part of the
ratio."""


def _decoders(n: int) -> tuple[list[float], list[float]]:
    """jfk.flac decoded to 16 kHz mono float32 by earshot's decoder (from the upload's bytes, as the
    API does) and by faster-whisper's (from the path, as the direct side does), interleaved."""
    from faster_whisper import decode_audio as fw_decode

    from earshot.audio.decode import decode_audio

    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(2):  # warm-up
        decode_audio(JFK.read_bytes(), sample_rate=16000)
        fw_decode(str(JFK), sampling_rate=16000)
    for _ in range(n):
        start = time.perf_counter()
        decode_audio(JFK.read_bytes(), sample_rate=16000)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        fw_decode(str(JFK), sampling_rate=16000)
        theirs.append(time.perf_counter() - start)
    return ours, theirs


def run(ctx: Context) -> BenchResult:
    n = ctx.reps(20, 5)
    warmup = ctx.reps(3, 1)
    audio = JFK.read_bytes()
    result = BenchResult(NAME, TITLE, METHOD)
    log(f"direct: loading {STT_MODEL} in-process")
    model = direct.load_whisper(STT_MODEL)
    compute_type = direct.compute_type(model)
    try:
        with earshot_server(ctx, NAME) as server, server.client() as client:
            load_model(client, STT_MODEL)
            for _ in range(warmup):
                transcribe(client, audio)
                direct.transcribe_file(model, JFK)
            log(f"timing {n} earshot + {n} direct transcriptions, interleaved")
            before = scrape(client)
            api: list[float] = []
            lib: list[float] = []
            texts: dict[str, str] = {}
            for i in range(n):
                quiesce()
                for side in ("earshot", "direct") if i % 2 == 0 else ("direct", "earshot"):
                    start = time.perf_counter()
                    if side == "earshot":
                        texts[side] = transcribe(client, audio)["text"]
                        api.append(time.perf_counter() - start)
                    else:
                        texts[side] = direct.transcribe_file(model, JFK)
                        lib.append(time.perf_counter() - start)
            after = scrape(client)
        log("timing the two decoders in-process (explains part of a gap)")
        dec_earshot, dec_fw = _decoders(n)
    finally:
        del model
        quiesce()
    labels = {"model": STT_MODEL, "task": "transcription"}
    server_inference_mean = histogram_mean(before, after, "earshot_inference_duration_seconds", **labels)
    result.rows.append(
        median_ratio_row(
            NAME,
            "request time, median",
            api,
            lib,
            TARGET,
            f"n={n} each; earshot p95 {summary(api)['p95'] * 1000:.0f} ms, "
            f"direct p95 {summary(lib)['p95'] * 1000:.0f} ms; compute_type {compute_type}; "
            f"same text: {texts.get('earshot') == texts.get('direct')}",
        )
    )
    result.rows.append(
        Row(
            NAME,
            "server inference (mean) vs direct",
            server_inference_mean * 1000,
            "ms",
            baseline=median(lib) * 1000,
            note="earshot_inference_duration_seconds over the timed requests (worker-thread transcribe)",
        )
    )
    result.rows.append(
        Row(
            NAME,
            "audio decode: earshot vs faster-whisper",
            median(dec_earshot) * 1000,
            "ms",
            baseline=median(dec_fw) * 1000,
            note="in-process: earshot.audio.decode_audio(bytes) vs faster_whisper.decode_audio(path)",
        )
    )
    result.details = {
        "model": STT_MODEL,
        "iterations": n,
        "earshot_s": summary(api),
        "direct_s": summary(lib),
        "target": TARGET,
        "server_inference_mean_s": server_inference_mean,
        "direct_options": {k: str(v) for k, v in direct.whisper_options().items()},
        "compute_type_resolved": compute_type,
        "beam_size": direct.BEAM_SIZE,
        "temperature": direct.FALLBACK_TEMPERATURES,
        "texts_equal": texts.get("earshot") == texts.get("direct"),
        "text_earshot": texts.get("earshot"),
        "text_direct": texts.get("direct"),
        "decode_earshot_s": summary(dec_earshot),
        "decode_faster_whisper_s": summary(dec_fw),
        "samples_earshot_s": api,
        "samples_direct_s": lib,
    }
    return result
