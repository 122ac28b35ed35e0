"""earshot: an OpenAI-compatible speech server whose model cache is observable end to end."""

__version__ = "0.1.0"
