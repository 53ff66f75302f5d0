"""Settings: the server arguments, model folder inspection and task inference, the model store."""
