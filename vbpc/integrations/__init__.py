"""Integrations with other libraries' training loops (Hugging Face ``transformers``)."""
