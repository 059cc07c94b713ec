"""Defaults the engine and the service's config share (a module without torch: Serve front ends
import the config and stay light)."""

# k of the shipped q′, chosen by measurement on the default pair (bench/sparse_k.py, README).
DEFAULT_DRAFT_TOP_K = 256
# Share of a discarded draft-ahead's compute that delays verification (engine.loop.draft_ahead_pays).
DEFAULT_DRAFT_AHEAD_WASTE_COST = 0.5
