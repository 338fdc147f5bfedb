"""Language models: resolving and loading them, generation, and the training run every trainer shares."""
