"""Datasets, models and Hydra tasks that reproduce the project's studies.

Nothing in ``attribution/`` or ``estimators/`` imports from here.
"""
