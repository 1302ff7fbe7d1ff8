"""oom-supervisor: run a fine-tuning command and walk it down a ladder until it fits in memory."""

__version__ = "0.1.0"
