"""Training: losses, the shared CLIP training loop, stage-1 pretraining and stage-2 distillation."""
