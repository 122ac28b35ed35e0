"""2. Warm TTS overhead: the API against kokoro-onnx called directly, in one run, interleaved."""

from __future__ import annotations

import time

import numpy as np

from bench import direct
from bench.common import (
    TTS_MODEL,
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
    ratio,
    scrape,
    speech,
    summary,
)

NAME = "tts"
TITLE = "Warm TTS overhead (Kokoro int8, 2 sentences, wav)"
TARGET = 1.05
TEXT = "Hello world. The quick brown fox jumps over the lazy dog."
VOICE = "jf_alpha"  # a voice of the demo model, named explicitly on both sides
LANG = "en-us"
METHOD = f"""\
earshot: wall time of one `POST /v1/audio/speech` (model {TTS_MODEL}, voice {VOICE}, speed 1,
response_format wav, default lang {LANG}) with the 2-sentence text {TEXT!r}, from an httpx client with a
kept-alive connection, to the whole body read. The server runs Kokoro.create once on the whole text
in a worker thread (as the direct side does; only stream=true goes sentence by sentence) and encodes WAV.
direct: wall time of `Kokoro.create(text, voice=<style of {VOICE}>, speed=1.0, lang="{LANG}")` in the
benchmark process on an onnxruntime session made as KokoroBackend makes it (same providers, default
session options), plus a 16-bit WAV encode (stdlib wave) so both sides end with WAV bytes.
direct, per sentence (not a target): the same, but one Kokoro.create per sentence as earshot's
streamed speech splits them (earshot.backends.kokoro.split_sentences), concatenated, then WAV: what the
split costs a stream.
All warm; timed calls rotate the order of the three each iteration; medians.
Ratio = earshot median / direct median."""


def run(ctx: Context) -> BenchResult:
    from earshot.backends.kokoro import split_sentences

    n = ctx.reps(20, 3)
    warmup = ctx.reps(3, 1)
    result = BenchResult(NAME, TITLE, METHOD)
    log(f"direct: loading {TTS_MODEL} in-process")
    kokoro = direct.load_kokoro(TTS_MODEL)
    style = direct.voice_style(kokoro, VOICE)
    sentences = split_sentences(TEXT)

    def whole() -> bytes:
        samples, rate = kokoro.create(TEXT, voice=style, speed=1.0, lang=LANG)
        return direct.to_wav(samples, rate)

    def per_sentence() -> bytes:
        parts = [kokoro.create(s, voice=style, speed=1.0, lang=LANG) for s in sentences]
        return direct.to_wav(np.concatenate([p[0] for p in parts]), parts[0][1])

    with earshot_server(ctx, NAME) as server, server.client() as client:
        load_model(client, TTS_MODEL)

        def api_call() -> bytes:
            return speech(client, TEXT, VOICE)

        sides = {"earshot": api_call, "direct": whole, "direct_per_sentence": per_sentence}
        for _ in range(warmup):
            for fn in sides.values():
                fn()
        log(f"timing {n} x (earshot, direct, direct per sentence), rotating order")
        before = scrape(client)
        times: dict[str, list[float]] = {k: [] for k in sides}
        seconds: dict[str, float] = {}
        order = list(sides)
        for i in range(n):
            quiesce()
            for side in order[i % 3 :] + order[: i % 3]:
                start = time.perf_counter()
                body = sides[side]()
                times[side].append(time.perf_counter() - start)
                seconds[side] = direct.wav_seconds(body)
        after = scrape(client)
    labels = {"model": TTS_MODEL, "task": "speech"}
    inference_mean = histogram_mean(before, after, "earshot_inference_duration_seconds", **labels)
    api, lib, split = times["earshot"], times["direct"], times["direct_per_sentence"]
    result.rows.append(
        median_ratio_row(
            NAME,
            "request time, median",
            api,
            lib,
            TARGET,
            f"n={n} each; audio {seconds.get('earshot', 0):.2f} s (earshot) vs "
            f"{seconds.get('direct', 0):.2f} s (direct)",
        )
    )
    result.rows.append(
        Row(
            NAME,
            "vs direct, per sentence (as stream=true splits)",
            median(api) * 1000,
            "ms",
            baseline=median(split) * 1000,
            note=f"{len(sentences)} Kokoro.create calls; direct per sentence / direct whole = "
            f"{ratio(median(split), median(lib)):.3f}",
        )
    )
    result.rows.append(
        Row(
            NAME,
            "server inference (mean) vs direct",
            inference_mean * 1000,
            "ms",
            baseline=median(lib) * 1000,
            note="earshot_inference_duration_seconds over the timed requests",
        )
    )
    result.details = {
        "model": TTS_MODEL,
        "text": TEXT,
        "voice": VOICE,
        "lang": LANG,
        "sentences": sentences,
        "iterations": n,
        "earshot_s": summary(api),
        "direct_s": summary(lib),
        "direct_per_sentence_s": summary(split),
        "target": TARGET,
        "server_inference_mean_s": inference_mean,
        "audio_seconds": seconds,
        "samples_earshot_s": api,
        "samples_direct_s": lib,
        "samples_direct_per_sentence_s": split,
    }
    return result
