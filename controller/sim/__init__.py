"""``classcap sim``: a simulated fleet (real controller, broker, agents and an S3 store) run
through a scenario of lessons, teacher presses and faults, then reconciled."""
