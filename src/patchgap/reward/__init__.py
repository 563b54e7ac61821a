"""The rewriter's reward: the paper's group reward (pure math), the pi0 scoring it needs (judge,
NLL in a QA context, embeddings) and the adapter that hands it to TRL per group of K.

May import: patchgap.lm and everything below it.
"""
