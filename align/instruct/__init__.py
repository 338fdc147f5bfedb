"""The Self-Instruct algorithm: seed tasks, prompts, parsing and filters, near-duplicates, the journaled loop."""
