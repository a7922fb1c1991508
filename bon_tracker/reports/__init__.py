"""Charts, the HTML report and run comparison (runs are read back through each backend's reader)."""
