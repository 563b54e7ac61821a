"""KFP component of the gate stage: a thin wrapper around ``patchgap.stages.gate``.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output

from patchgap.kfp.images import image_for


@dsl.component(base_image=image_for("gate"), install_kfp_package=False)
def gate(
    config: str,
    dataset: Input[Dataset],
    candidates: Input[Dataset],
    dataset_r: Output[Dataset],
    report: Output[Dataset],
    metrics: Output[Metrics],
    report_html: Output[HTML],
    report_md: Output[Markdown],
) -> float:
    """Verify the candidates with r_task, keep the lowest-NLL feasible one per record or fall
    back to the reference solution; write D_R, the accepted-only subset and the gate report.
    Logs acceptance_rate, nll_gap and fallback_count."""
    import shutil
    from pathlib import Path

    from patchgap.stages.base import run_component

    result = run_component(
        "gate",
        config,
        {"dataset": dataset, "candidates": candidates},
        {"dataset_r": dataset_r, "report": report},
        metrics,
    )
    # The KFP UI renders these two artifacts inline.
    shutil.copyfile(Path(report.path) / "gate_report.html", report_html.path)
    shutil.copyfile(Path(report.path) / "gate_report.md", report_md.path)
    # The acceptance rate is returned as the task's plain ``Output`` parameter so a pipeline can
    # branch on it (dsl.If before SFT); kfp.local resolves only that form in conditions.
    return float(result["acceptance_rate"])
