"""effine: efficient fine-tuning of open LLMs (LoRA, QLoRA, QAT, full) on CPU and CUDA."""

__version__ = "0.1.0"
