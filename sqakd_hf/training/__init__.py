"""Training: the SQAKD Trainer, its arguments, the distillation losses, the EWGS schedule, and metrics."""
