"""speccascade bench: speed against the analytic bound, the HF peer, cascades, concurrency."""
