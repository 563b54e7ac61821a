"""KFP pipelines wiring the five stages (full, rewrite, watch), their default parameters, pod
placement, and compilation. Installed as ``patchgap.pipelines``; the compiled YAML is package data.

May import: patchgap.components and everything below it.
"""
