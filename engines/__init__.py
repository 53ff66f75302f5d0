"""Where work runs: the encoder batcher and runtime, generation backends, the remote predictor."""
