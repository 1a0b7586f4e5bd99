"""Alembic migrations of the controller's database, run through ``Database.migrate``."""
