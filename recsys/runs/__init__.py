"""Running the project: run-directory files, loggers, provenance, sweeps."""
