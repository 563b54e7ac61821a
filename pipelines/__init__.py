"""KFP pipelines wiring the five stages."""
