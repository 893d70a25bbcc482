"""The online scoring service, in rooms with one owner each (DESIGN.md section 2):

- `api/`: HTTP only. Wire types (`schemas`), routes, the outer ASGI guard (auth, body
  limit, request metrics), the FastAPI app and its lifespan.
- `engine/`: a validated request to scores. Request resolution (version snapshot, store
  lookup, cold start, encoding), admission by time, the queue and micro-batcher, the jobs
  that run on the model thread, the served-version tracker, POST /events.
- `backends/`: the model on encoded prompts and soft-token vectors (PyTorch + transformers,
  or vLLM); knows nothing of HTTP or of the store.
- `store/`: the embedding store (in-process and Redis), store versions, and the
  `sellarec-store` admin CLI that loads bundles into Redis.

Shared by the rooms: `settings` (flags and `SELLAREC_*`), `errors` (every error the API
answers with), `metrics` (Prometheus), `redact` (secrets out of messages), `cli`
(`sellarec-serve`).
"""
