"""lslo: Language-Specific LoRA for multilingual NMT (arXiv 2409.05224)."""

__version__ = "0.1.0"
