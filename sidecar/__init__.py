"""keymux: a per-pod sidecar that rotates LLM provider API keys with per-(key, model) health."""

__version__ = "0.1.0"
