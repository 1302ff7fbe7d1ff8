"""The TRL tier: the real `trl sft` under the supervisor, in its own venv (.venv-trl)."""
