"""I-JEPA / StoP pretraining: schedules, target normalisation, the training step and loop."""
