"""What every stage shares: volumes and their geometry, label ids, outputs and weights on disk, seeds and timers."""
