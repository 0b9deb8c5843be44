"""The root of Swarm's exception family. Subsystems derive their own errors from it."""


class SwarmError(Exception):
    """Base of every error Swarm raises on purpose."""
