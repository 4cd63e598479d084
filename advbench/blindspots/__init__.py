"""Blind-spot analysis (Level Set Traversal): placeholder, being written (issue 3)."""
