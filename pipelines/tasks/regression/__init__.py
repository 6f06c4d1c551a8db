"""Regression (Table V): an MLP on a tabular set (task.py) and its data (data.py)."""
