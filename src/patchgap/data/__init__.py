"""The data contract: records (datasets of questions and reference solutions, field maps, rejects),
the evaluation sets and their lm-eval task files, and the ledger of processed datasets.

May import: the ground floor (answers, config, errors, settings) and patchgap.storage.
"""
