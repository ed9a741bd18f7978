"""Evaluation: metrics against human references and preferences, reports."""
