"""Loading and saving weights: Hugging Face checkpoints and adapter-only training state."""
