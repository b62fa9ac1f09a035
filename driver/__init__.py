"""The driver's parts: its Ray session, the supervisor, the run metrics, and serial mode."""
