"""Figures and reports: statistics (intervals, paired tests), the forgetting table, the gate and
evaluation reports, and a run's reproduction report.

May import: patchgap.lm and everything below it (not patchgap.reward or patchgap.training).
"""
