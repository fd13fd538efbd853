"""Model plumbing shared by every method: loading, adapters (peft LoRA / QLoRA), quantization, generation."""
