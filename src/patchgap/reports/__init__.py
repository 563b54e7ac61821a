"""Figures and reports: statistics (intervals, paired tests), the forgetting table, the gate and
evaluation reports, a run's reproduction report, and the SFT calibration sweep's decision rule.

May import: patchgap.lm and everything below it (not patchgap.reward or patchgap.training).
"""
