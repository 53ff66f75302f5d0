"""KServe's container entry point, `python -m huggingfaceserver --model_name=... --model_id=...`."""
