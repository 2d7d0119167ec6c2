"""speedq-mlx serve: an OpenAI-compatible chat server for an artifact, prompting InternVL in
its own chat template (protocol.py: requests, errors; engine.py: the model on one thread;
app.py: the HTTP routes)."""
