"""Metric implementations shared by the task modules (all pure Python / numpy, no reference libraries)."""
