"""lorax: LoRA for pretrained transformers as a functional transform of JAX parameter trees."""

__version__ = "0.1.0"
