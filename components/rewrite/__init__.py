"""KFP component of the rewrite stage."""
