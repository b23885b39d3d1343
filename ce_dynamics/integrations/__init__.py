"""Adapters for training loops other than Lightning (``ce_dynamics.integrations.transformers``)."""
