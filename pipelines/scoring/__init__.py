"""Where events are scored: the model from the MLflow registry and the check of its inputs
against what the platform serves, the feature vectors read from the online store as the training
join gives them, and ``fp-score``'s loop (valid events in, one prediction per event id out,
exactly once)."""
