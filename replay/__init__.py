"""Sharded proportional prioritized replay; plain classes plus a thin Ray wrapper."""
