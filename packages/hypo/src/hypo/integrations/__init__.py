"""Integrations with peer libraries: ``hypo.integrations.trl`` (TRL's ``DPOTrainer``).

The module imports trl when its trainer is first accessed; install ``hypo[trl]``.
"""
