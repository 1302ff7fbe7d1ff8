"""The directory `--device-memory` puts first on PYTHONPATH; only its sitecustomize.py matters."""
