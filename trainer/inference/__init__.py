"""After training: loading a finished run, predict, TTA, evaluate, Grad-CAM, export, generate,
summary and pictures."""
