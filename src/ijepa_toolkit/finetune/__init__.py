"""MAE-recipe finetuning: config, recipe (timm pieces), engine (train/evaluate), run."""
