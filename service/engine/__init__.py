"""From a validated request to scores: resolution, admission, queue, batches, served version."""
