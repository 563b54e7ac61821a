"""The data contract, the one home of "a dataset": records and field maps (fields), the registry
of named sets (registry), one reader per format (readers), sources and the cache (sources), row
to record (convert), rejects, streaming (stream), writers; the evaluation items and their lm-eval
task files (evalsets), and the ledger of processed datasets (ledger).

May import: the ground floor (answers, config, errors, settings) and patchgap.storage.
"""
