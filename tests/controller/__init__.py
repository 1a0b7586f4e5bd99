"""Tests of the fleet controller."""
