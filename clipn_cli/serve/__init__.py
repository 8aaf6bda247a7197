"""`clipn serve`: the detector as an always-on HTTP service (engine: batching worker; app: endpoints;
run: uvicorn with a graceful stop; client: `detect --server`). Starlette and uvicorn are imported
only by `app` and `run`, so the client works without the `serve` extra."""
