"""Fine-tuning a pretrained GPT: sequence classification (``classify``), instruction following
(``instruct``) and the datasets both build from the bundled Shakespeare works (``datasets``).
Low-rank adapters live in ``npgpt.lora``."""
from .datasets import load_works, split_works, genre_passages, load_labeled, instruction_examples, pad_batch

__all__ = ["load_works", "split_works", "genre_passages", "load_labeled", "instruction_examples", "pad_batch"]
