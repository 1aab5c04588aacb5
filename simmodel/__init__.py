"""OpenAI-compatible simulated model server: the default model when no API key is set."""
