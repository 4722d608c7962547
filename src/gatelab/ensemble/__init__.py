"""Mixtures and ensembles of whole models and solvers (issue 18)."""
