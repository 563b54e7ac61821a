"""KFP components: one thin component per stage (see each folder's README)."""
