"""The paper's experiments at small scale (``wadi-distill reproduce``) and their report."""
