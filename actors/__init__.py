"""Actors: step batches of environments, build n-step transitions, push them to replay."""
