"""Statistics over stored runs: final scores and learning curves compared across seeds."""
