"""Training: the driver (`launch`), the schedule, and one worker function per backend."""
