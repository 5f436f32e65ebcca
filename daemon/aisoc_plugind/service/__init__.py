"""Compose and run the daemon: one task group, signals, watcher, sd_notify, components.

Imports `api`, `engine`, `delivery` and below.
"""

__all__: list[str] = []
