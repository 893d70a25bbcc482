"""Backends run the model on encoded prompts and soft-token vectors (torch or vLLM)."""
