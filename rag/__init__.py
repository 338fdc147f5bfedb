"""rag: evaluate how base and aligned models use retrieved passages."""
