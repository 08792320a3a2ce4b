"""Adaptation: parameter-efficient fine-tuning with ``peft`` (LoRA, prompt tuning, scaled prompt tuning) and a
hypernetwork that writes LoRA weights from a few demonstrations. Every job ends in a checkpoint that
``edgelm export`` takes like any fine-tuned model."""
