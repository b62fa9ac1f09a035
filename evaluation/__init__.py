"""Evaluation: the protocol, the evaluator and its Ray host, the driver's periodic
evaluation, and the commands to score a checkpoint, play or watch, and plot a run."""
