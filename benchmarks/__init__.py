"""Throughput, model FLOP utilisation and memory of lorax's train steps, beside PEFT + PyTorch."""
