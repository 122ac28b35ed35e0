"""1. Warm STT overhead: the API against faster-whisper called directly, in one run, interleaved."""

from __future__ import annotations

import math
import time
from typing import Any

from bench import direct
from bench.common import (
    JFK,
    STT_MODEL,
    BenchResult,
    Context,
    Row,
    earshot_server,
    load_model,
    log,
    median,
    median_ratio_row,
    metric_delta,
    quiesce,
    scrape,
    summary,
    transcribe,
    unload_model,
)
from earshot.cache.memory import release_memory

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
cpu_threads 0, num_workers 1; the resolved compute type is recorded), in a thread that ends with
the construction as the server's loads are (`bench.direct.load_whisper`), and transcribed with the
options the API passes (beam_size 5, temperature fallback 0.0..1.0, no language, no prompt, no VAD,
no word timestamps). The report says whether both sides produced the same text.
4 rounds; each round loads the model afresh on both sides (`DELETE /api/ps` then `POST /api/ps` on
the server, a new WhisperModel directly: how fast a loaded model runs varies by a few per cent from
one load to the next on a small VM, with where its memory landed), makes both warm (untimed calls),
then times 10 calls of each side, alternating earshot/direct with the order flipped each iteration.
Medians over the 40 calls of each side. Ratio = earshot median / direct median. The server's own inference time
(earshot_inference_duration_seconds, sum/count over the timed calls) splits earshot's time into
inference and everything around it. On the side, earshot's decoder is timed against faster-whisper's
own (`decode_audio(path)`, what `transcribe("jfk.flac")` would use): that difference is not part of the
ratio. Last, not interleaved and after everything else (it slows every model of the process from
then on): the same direct transcription of a model built on the main thread, as a plain script
builds it, against the direct median above: what libgomp's throttled spinning costs when the
thread that loaded a model lives on (earshot.inference.workers.run_in_own_thread)."""


INFERENCE = "earshot_inference_duration_seconds"
LABELS = {"model": STT_MODEL, "task": "transcription"}


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


def _main_thread_model(n: int, warmup: int) -> list[float]:
    """Times of `n` direct transcriptions by a model built on the calling (main) thread."""
    model = direct.load_whisper(STT_MODEL, own_thread=False)
    try:
        for _ in range(warmup):
            direct.transcribe_file(model, JFK)
        times: list[float] = []
        for _ in range(n):
            quiesce()
            start = time.perf_counter()
            direct.transcribe_file(model, JFK)
            times.append(time.perf_counter() - start)
        return times
    finally:
        del model


def run(ctx: Context) -> BenchResult:
    rounds = ctx.reps(4, 1)
    per_round = ctx.reps(10, 5)
    n = rounds * per_round
    warmup = ctx.reps(2, 1)
    audio = JFK.read_bytes()
    result = BenchResult(NAME, TITLE, METHOD)
    model: Any = None
    api: list[float] = []
    lib: list[float] = []
    texts: dict[str, str] = {}
    inference_sum = inference_count = 0.0
    try:
        with earshot_server(ctx, NAME) as server, server.client() as client:
            for r in range(rounds):
                # a fresh load on both sides each round: how fast a loaded model runs varies by a few
                # per cent from one load to the next (where its memory landed)
                log(f"round {r + 1}/{rounds}: loading {STT_MODEL} on both sides")
                if model is not None:
                    del model
                    release_memory()
                    unload_model(client, STT_MODEL)
                model = direct.load_whisper(STT_MODEL)
                load_model(client, STT_MODEL)
                for _ in range(warmup):
                    transcribe(client, audio)
                    direct.transcribe_file(model, JFK)
                log(f"timing {per_round} earshot + {per_round} direct transcriptions, interleaved")
                start_scrape = scrape(client)
                for i in range(per_round):
                    quiesce()
                    for side in ("earshot", "direct") if i % 2 == 0 else ("direct", "earshot"):
                        start = time.perf_counter()
                        if side == "earshot":
                            texts[side] = transcribe(client, audio)["text"]
                            api.append(time.perf_counter() - start)
                        else:
                            texts[side] = direct.transcribe_file(model, JFK)
                            lib.append(time.perf_counter() - start)
                end_scrape = scrape(client)
                inference_sum += metric_delta(start_scrape, end_scrape, f"{INFERENCE}_sum", **LABELS)
                inference_count += metric_delta(start_scrape, end_scrape, f"{INFERENCE}_count", **LABELS)
        compute_type = direct.compute_type(model)
        log("timing the two decoders in-process (explains part of a gap)")
        dec_earshot, dec_fw = _decoders(n)
    finally:
        del model
        quiesce()
    log(f"timing {n} direct transcriptions of a model built on the main thread")
    on_main = _main_thread_model(n, warmup)
    server_inference_mean = inference_sum / inference_count if inference_count else math.nan
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
            "direct, model built on the main thread",
            median(on_main) * 1000,
            "ms",
            baseline=median(lib) * 1000,
            note="not interleaved, measured last; vs the direct median (model built in a thread that ended)",
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
        "samples_direct_main_thread_s": on_main,
    }
    return result
