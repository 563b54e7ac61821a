"""patchgap: rewrite an SFT dataset with an RL-trained rewriter so fine-tuning forgets less.

Importing the package is cheap: torch, transformers, trl, peft and vllm are imported inside the
functions that need them. Imports point down only (tests/unit/test_layers.py enforces it):

    cli
    run                      prepare and execute a run locally
    pipelines                KFP pipelines and their compilation   (top-level folder pipelines/)
    components               one thin KFP component per stage     (top-level folder components/)
    kfp                      KFP API client, image references
    stages                   Config + run() per stage, and the one way into a stage
    training                 what train-rewriter and sft share
    reward | reports | study the group reward and pi0 scoring | statistics and reports |
                             the study's arms and settings
    lm                       models and generation backends
    data                     records, evaluation sets, ledger
    storage                  S3 store, embedded server, credentials
    (this package's modules) answers, prompts, config, settings, errors, logs, progress

Packages on one line are independent of each other.
"""

__version__ = "0.1.0"
