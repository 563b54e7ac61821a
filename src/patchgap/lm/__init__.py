"""Language models: resolve a model reference, load it (safetensors only, no remote code),
convert the demo model, build tiny test models, and the generation backends (transformers,
vLLM) behind one interface.

May import: the ground floor, patchgap.storage and patchgap.data.
"""
