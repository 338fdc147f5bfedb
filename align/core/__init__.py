"""The stage contract that every command builds on: errors, config parsing, inputs, outputs, journals, hub."""
