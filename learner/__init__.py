"""The learner: double DQN on prioritized n-step batches, its input pipeline, its Ray host."""
