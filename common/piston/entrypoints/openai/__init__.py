"""The OpenAI-compatible HTTP server (``piston serve``)."""
