"""KFP component of the study's report (statistics and figures of patchgap.reports.study)."""
