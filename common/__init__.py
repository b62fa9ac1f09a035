"""Shared pieces that know nothing of Ray: config, networks, envs, schedules, checkpoints."""
