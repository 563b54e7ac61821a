"""Helpers of the train-rewriter stage: checkpoint sync with the store, per-step metrics, the
reward-curve plot and the multi-GPU relaunch. Importing a submodule may import torch/transformers;
this package itself imports nothing heavy."""
