"""align: the InstructGPT recipe as stages connected by datasets on disk."""
