"""The ``patchgap`` command (typer): thin, each command calls the packages below.

May import: everything.
"""
