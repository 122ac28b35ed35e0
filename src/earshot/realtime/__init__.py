"""Realtime transcription over WebSocket (DESIGN §9): the transcription-session subset of the
OpenAI Realtime API, as the installed `openai` SDK defines its events, on the inference service.

- route.py     the WebSocket handler: auth, admission, the receive loop, idle timeout
- session.py   one session: client events, the input buffer, turns, transcription
- events.py    client event parsing and server events, in the SDK's own types
- config.py    a session's effective configuration and `session.update`
- audio.py     pcm16 24 kHz / G.711 8 kHz to 16 kHz float32 (PyAV)
- vad.py       Silero VAD (faster-whisper's ONNX file) and the server_vad turn logic
- buffer.py    the input audio buffer
- registry.py  open sessions (max_realtime_sessions, per model for /api/ps), event fan-out
"""

from earshot.realtime.registry import RealtimeSessions
from earshot.realtime.route import RealtimeLimits, realtime_handler

__all__ = ["RealtimeLimits", "RealtimeSessions", "realtime_handler"]
