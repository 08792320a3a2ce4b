"""Compression before export: fine-tuning (AdamW / SAGE), structured pruning (PLATON, magnitude),
knowledge distillation (task-aware layer-wise, HomoDistil), and the cost model. Torch-side only."""
