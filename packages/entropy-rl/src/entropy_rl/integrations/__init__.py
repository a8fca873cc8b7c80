"""Integrations with peer libraries: ``entropy_rl.integrations.trl`` (TRL) and ``entropy_rl.integrations.verl``.

Each module imports its library on import; install ``entropy-rl[trl]`` or ``entropy-rl[verl]``.
"""
