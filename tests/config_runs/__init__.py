"""Every shipped config, shrunk, run end to end (make test-configs)."""
