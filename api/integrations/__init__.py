"""Recording for training libraries: Stable-Baselines3 (`gymbus.integrations.sb3`)."""
