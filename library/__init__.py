"""Shared code of the sdtrain scripts: model I/O, data pipeline, training loop."""
