"""wadi_distill: LoRaD adapters and VSD one-step distillation (WaDi §2-3). Built in later issues."""
