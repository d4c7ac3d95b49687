"""What runs in the notebook's (or CLI's) process: launching workers, the Run
record, the supervisor that collects events and output, supervises ranks and
restarts them, and resuming a run folder. Imports nothing from ``ddlkit.view``
or ``ddlkit.rank``."""
