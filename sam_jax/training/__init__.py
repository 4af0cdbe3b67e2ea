"""Training code for SAM: losses, interactive prompt simulation, optimiser."""
