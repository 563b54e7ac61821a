"""The ``patchgap`` command line."""
