"""The recording agent that runs on each classroom unit."""
