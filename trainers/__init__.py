"""Command-line trainers: `python -m trainers.<experiment>`."""
