"""Training: example windows from user histories, the target's training loop."""
