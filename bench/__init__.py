"""`sellarec-bench`: the scoring engine against the straightforward path, vLLM and the
roofline, in process (no HTTP; `loadtest/` measures the service over HTTP)."""
