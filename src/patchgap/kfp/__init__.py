"""The KFP side that talks to a cluster or names what runs there: the KFP API client (submit,
schedules, doctor) and the container image references. Nothing here imports the kfp SDK at
import time.

May import: patchgap.stages and everything below it.
"""
