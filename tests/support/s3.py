"""Real SeaweedFS S3 fixture (to be written)."""
