"""What runs in every worker process: the entry point, the one rank loop, the
reporter, live controls, faults, stragglers and meters. Imports nothing from
``ddlkit.kernel`` or ``ddlkit.view``."""
