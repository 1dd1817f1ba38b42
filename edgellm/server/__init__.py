"""OpenAI-compatible HTTP server (FastAPI on uvicorn) and the web chat page."""
