"""`chatrlhf serve`: an OpenAI-compatible chat server on the generation engine (docs/serve.md). app.py wires the
FastAPI app; completions.py is POST /v1/chat/completions; protocol.py the request models and the error shape;
text.py the streaming text; limits.py API keys and admission; metrics.py /metrics."""
