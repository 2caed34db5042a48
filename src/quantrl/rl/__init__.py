"""RL algorithms: mismatch metrics and importance-sampling correction, policy losses."""
