"""Evaluations: retrieval (ITC + ITM re-rank), and the world's minimal-edit and grounding metrics."""
