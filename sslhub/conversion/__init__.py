"""Official checkpoints (and Hugging Face transformers ports) to sslhub models, and back (DESIGN.md §2)."""
