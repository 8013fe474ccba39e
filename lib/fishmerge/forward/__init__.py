"""Forward passes that skip work a model's head never reads (scoring and Fisher estimation share them)."""
