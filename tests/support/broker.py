"""Real Mosquitto broker fixture (to be written)."""
