"""hf_vitmerge: merge Hugging Face Vision Transformers."""

__version__ = "0.1.0"
