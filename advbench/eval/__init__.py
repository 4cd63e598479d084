"""Evaluation: the evaluator, its jobs and tables."""
