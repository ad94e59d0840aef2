"""Core: the gate config, the gate module and the shared attention mechanism (torch + transformers only)."""
