"""KFP component of the evaluate stage."""
