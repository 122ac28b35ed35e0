// The playground: transcribe an uploaded or recorded clip (optionally streamed segment by
// segment), and synthesize speech and play it in the page.

import { getJSON, readEvents, request } from "./api.js";
import { el } from "./format.js";

const $ = (id) => document.getElementById(id);

function fillSelect(select, ids) {
  const current = select.value;
  select.replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
  if (ids.includes(current)) select.value = current;
}

function stamp(s) {
  return Number(s || 0).toFixed(1);
}

export class Playground {
  constructor({ onError }) {
    this.onError = onError;
    this.recorded = null;
    this.recorder = null;
    this.audioUrl = null;
    this.voicesFor = null;
    $("stt-form").addEventListener("submit", (e) => { e.preventDefault(); this.transcribe(); });
    $("tts-form").addEventListener("submit", (e) => { e.preventDefault(); this.speak(); });
    $("stt-record").addEventListener("click", () => this.toggleRecording());
    $("stt-file").addEventListener("change", () => { this.recorded = null; $("stt-recorded").textContent = ""; });
    // Listing voices loads the speech model, so it waits until someone asks for a voice.
    $("tts-voice").addEventListener("focus", () => this.loadVoices());
    $("tts-model").addEventListener("change", () => { this.voicesFor = null; });
    if (!navigator.mediaDevices || !window.MediaRecorder) $("stt-record").hidden = true;
  }

  setModels(models) {
    fillSelect($("stt-model"), models.modelsOf("transcription"));
    fillSelect($("tts-model"), models.modelsOf("speech"));
  }

  async toggleRecording() {
    const button = $("stt-record");
    if (this.recorder) { this.recorder.stop(); return; }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      $("stt-recorded").textContent = `microphone not available: ${e.message}`;
      return;
    }
    const chunks = [];
    const started = performance.now();
    this.recorder = new MediaRecorder(stream);
    this.recorder.addEventListener("dataavailable", (e) => chunks.push(e.data));
    this.recorder.addEventListener("stop", () => {
      for (const track of stream.getTracks()) track.stop();
      this.recorded = new Blob(chunks, { type: this.recorder.mimeType || "audio/webm" });
      this.recorder = null;
      button.textContent = "Record";
      $("stt-recorded").textContent = `recorded ${((performance.now() - started) / 1000).toFixed(1)} s`;
    });
    this.recorder.start();
    button.textContent = "Stop";
    $("stt-recorded").textContent = "recording…";
  }

  async transcribe() {
    const file = this.recorded || $("stt-file").files[0];
    const status = $("stt-status");
    const out = $("stt-output");
    if (!file) { status.textContent = "Choose an audio file or record one first."; return; }
    const format = $("stt-format").value;
    const stream = $("stt-stream").checked;
    const form = new FormData();
    form.append("file", file, file.name || "recording.webm");
    form.append("model", $("stt-model").value);
    form.append("response_format", format);
    if ($("stt-language").value.trim()) form.append("language", $("stt-language").value.trim());
    if (stream) form.append("stream", "true");
    $("stt-submit").disabled = true;
    out.textContent = "";
    out.dataset.done = "false";
    status.textContent = "transcribing…";
    const started = performance.now();
    try {
      const response = await request("/v1/audio/transcriptions", { method: "POST", body: form });
      if (stream) {
        await readEvents(response, ({ data }) => {
          if (!data) return;
          const event = JSON.parse(data);
          if (event.type === "transcript.text.delta") {
            const seg = event.segment || {};
            out.append(el("div", { class: "segment", text: `[${stamp(seg.start)}–${stamp(seg.end)}] ${event.delta.trim()}` }));
          } else if (event.type === "transcript.text.done") {
            out.append(el("div", { class: "final", text: event.text }));
          }
        });
      } else if (format === "json") {
        out.textContent = (await response.json()).text;
      } else if (format === "verbose_json") {
        out.textContent = JSON.stringify(await response.json(), null, 2);
      } else {
        out.textContent = await response.text();
      }
      out.dataset.done = "true";
      status.textContent = `done in ${((performance.now() - started) / 1000).toFixed(2)} s`;
    } catch (e) {
      status.textContent = `failed: ${e.message}`;
      this.onError(e);
    } finally {
      $("stt-submit").disabled = false;
    }
  }

  async loadVoices() {
    const model = $("tts-model").value;
    if (!model || this.voicesFor === model) return;
    this.voicesFor = model;
    try {
      const voices = await getJSON(`/v1/audio/voices?model=${encodeURIComponent(model)}`);
      $("tts-voices").replaceChildren(...voices.data.map((v) => el("option", { value: v.voice })));
    } catch (e) {
      this.voicesFor = null;
      this.onError(e);
    }
  }

  async speak() {
    const status = $("tts-status");
    const audio = $("tts-audio");
    const format = $("tts-format").value;
    const body = {
      model: $("tts-model").value,
      input: $("tts-input").value,
      response_format: format,
      speed: Number($("tts-speed").value) || 1,
    };
    if ($("tts-voice").value.trim()) body.voice = $("tts-voice").value.trim();
    $("tts-submit").disabled = true;
    status.textContent = "synthesizing…";
    const started = performance.now();
    try {
      const response = await request("/v1/audio/speech", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const blob = await response.blob();
      if (this.audioUrl) URL.revokeObjectURL(this.audioUrl);
      this.audioUrl = URL.createObjectURL(blob);
      audio.src = this.audioUrl;
      const link = $("tts-download");
      link.href = this.audioUrl;
      link.download = `speech.${format}`;
      link.hidden = false;
      status.textContent = `${(blob.size / 1024).toFixed(1)} KiB in ${((performance.now() - started) / 1000).toFixed(2)} s`;
      audio.play().catch(() => { status.textContent += " · press play to listen"; });
    } catch (e) {
      status.textContent = `failed: ${e.message}`;
      this.onError(e);
    } finally {
      $("tts-submit").disabled = false;
    }
  }
}
