"""The main job on one machine: prepare a run (validate its YAML, stage the dataset, resolve the
model, start the embedded S3) and execute its pipeline under kfp.local.

May import: patchgap.pipelines and everything below it.
"""
