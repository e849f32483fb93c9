"""Evaluation: recall@N with the standard VPR protocol, and match pictures."""
