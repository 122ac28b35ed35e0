"""Per-format latency of a warm transcription (jfk.flac, tiny.en), and time to first audio byte of a
streamed 5-sentence speech request against the whole synthesis of the same text."""

from __future__ import annotations

import time

from bench.common import (
    JFK,
    STT_MODEL,
    TTS_MODEL,
    BenchResult,
    Context,
    Row,
    earshot_server,
    load_model,
    log,
    median,
)

NAME = "formats"
TITLE = "Transcription latency per response_format; streaming speech time to first byte"
FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "verbose_json+words")
FIVE = (
    "The first light came over the hills. Birds began to sing in the old oak tree. "
    "A farmer walked slowly to the barn. His dog ran ahead, barking at the geese. "
    "By noon the whole valley was warm and bright."
)
METHOD = f"""\
Transcription: client wall time of `POST /v1/audio/transcriptions` (model {STT_MODEL}, jfk.flac, warm)
for each response_format, the formats interleaved round by round; medians. verbose_json+words adds
timestamp_granularities[]=word (word timestamps cost decoder time).
Speech: {TTS_MODEL}, voice alloy, the 5-sentence text, response_format pcm, warm. Whole: wall time of
the non-streamed request to its last byte. Streamed (`stream: true`): time to the first audio byte
and to the last byte. Rounds alternate the two; medians."""


def run(ctx: Context) -> BenchResult:
    reps = ctx.reps(10, 2)
    audio = JFK.read_bytes()
    result = BenchResult(NAME, TITLE, METHOD)
    with earshot_server(ctx, NAME) as server, server.client() as client:
        load_model(client, STT_MODEL)
        load_model(client, TTS_MODEL)
        times: dict[str, list[float]] = {f: [] for f in FORMATS}
        for i in range(reps + 1):
            for fmt in FORMATS:
                data = {"model": STT_MODEL, "response_format": fmt.split("+")[0]}
                if fmt.endswith("+words"):
                    data["timestamp_granularities[]"] = "word"
                start = time.perf_counter()
                r = client.post("/v1/audio/transcriptions", files={"file": ("jfk.flac", audio)}, data=data)
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                if i:
                    times[fmt].append(elapsed)
        for fmt in FORMATS:
            result.rows.append(Row(NAME, f"transcription {fmt}", median(times[fmt]) * 1000, "ms"))
        log("transcription: " + ", ".join(f"{f} {median(times[f]) * 1000:.0f} ms" for f in FORMATS))

        body = {"model": TTS_MODEL, "voice": "alloy", "input": FIVE, "response_format": "pcm"}
        whole, first, last = [], [], []
        for i in range(reps + 1):
            start = time.perf_counter()
            client.post("/v1/audio/speech", json=body).raise_for_status()
            w = time.perf_counter() - start
            start = time.perf_counter()
            t_first = None
            with client.stream("POST", "/v1/audio/speech", json={**body, "stream": True}) as r:
                r.raise_for_status()
                for chunk in r.iter_bytes():
                    if chunk and t_first is None:
                        t_first = time.perf_counter() - start
            t_last = time.perf_counter() - start
            if i:
                whole.append(w)
                first.append(t_first or t_last)
                last.append(t_last)
        ttfb, full = median(first), median(whole)
        result.rows += [
            Row(
                NAME,
                "speech, 5 sentences: streamed time to first byte",
                ttfb * 1000,
                "ms",
                baseline=full * 1000,
                note="baseline: the whole synthesis, not streamed",
            ),
            Row(NAME, "speech, 5 sentences: streamed last byte", median(last) * 1000, "ms"),
        ]
        log(
            f"speech: first byte {ttfb * 1000:.0f} ms, whole {full * 1000:.0f} ms, stream end {median(last) * 1000:.0f} ms"
        )
    return result
