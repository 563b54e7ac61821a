"""KFP component of the gate stage."""
