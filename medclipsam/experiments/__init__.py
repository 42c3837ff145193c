"""The experiment harness: comparisons, label efficiency, prompt consistency, speed and memory, figures and demos,
built on the core (data, models, training, inference, eval) and never imported by it."""
