"""Training: optimizers and schedules, train state, sharding and the per-phase training steps."""
