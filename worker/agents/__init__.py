"""Agents: each gets its config as a dataclass and publishes through an injected emitter."""
