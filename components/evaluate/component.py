"""KFP component of the evaluate stage: a thin wrapper around ``patchgap.stages.evaluate``.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Metrics, Model, Output

from patchgap.kfp.images import image_for


@dsl.component(base_image=image_for("evaluate"), install_kfp_package=False)
def evaluate(
    config: str,
    report: Output[dsl.Artifact],
    metrics: Output[Metrics],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    base_model: Input[Model] = None,
    sft_d: Input[Model] = None,
    sft_dr: Input[Model] = None,
    sft_dr_prompt: Input[Model] = None,
    models: Input[list[Model]] = None,
):
    """Score base pi0, SFT on D and SFT on D_R on the downstream math and general benchmarks;
    write the forgetting table, the report (Markdown, HTML with plots), results.json and the
    per-item results. Models not wired here come from ``models:`` in the config (paths or
    s3:// URIs). Logs accuracy per model and benchmark, forgetting and its reduction.

    ``models`` (the study: every job's sft model, collected from a ParallelFor) adds one model
    per snapshot of each, labelled ``<arm>.s<seed>.step<N>`` from the job's ``study.json``;
    pi0 is scored as ``base`` from the config."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from patchgap.stages.base import run_component

    # The stage reads a folder whose subfolders are the models, named by their label.
    wired = {
        "base": base_model,
        "sft_d": sft_d,
        "sft_dr": sft_dr,
        # SFT on D_R from the prompt-only rewriting baseline (pi0 + fixed prompt, no RL).
        "sft_dr_prompt": sft_dr_prompt,
    }
    links = {label: Path(art.path) for label, art in wired.items() if art is not None}
    if models:
        from patchgap.study.jobs import model_labels

        for art in models:
            links.update(model_labels(art.path))
    folder = None
    if links:
        folder = Path(tempfile.mkdtemp(prefix="patchgap-models-"))
        for label, path in links.items():
            os.symlink(path, folder / label)

    class _Folder:
        path = str(folder)

    try:
        run_component(
            "evaluate",
            config,
            {"models": _Folder() if folder is not None else None},
            {"report": report},
            metrics,
        )
    finally:
        if folder is not None:  # symlinks only: rmtree removes the links, not the models
            shutil.rmtree(folder, ignore_errors=True)
    # The KFP UI renders these two artifacts inline.
    shutil.copyfile(Path(report.path) / "report.html", report_html.path)
    shutil.copyfile(Path(report.path) / "report.md", report_md.path)
