"""wadi_distill: LoRaD adapters and VSD one-step distillation (WaDi §2-3) of a multi-step teacher.

The method lives at the top (teacher, vsd, distill, sampling, adapters, lorad, config, runs, export, cli);
training/, evaluation/, embedded/ and experiments/ hold the loop, the metrics, the shipped teacher and
the reproduction. README's architecture map lists every module."""
