"""Figures and panels, the live Dashboard, the ControlPanel, the pipeline
timeline, staleness, sweeps and the HTML report. Reads runs through
``ddlkit.kernel``; never touches worker processes."""
