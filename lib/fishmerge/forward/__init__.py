"""How scoring and Fisher estimation run a model's forward: skipping work its head never reads
(`first_position`), a faster CPU kernel for its large products (`onednn_linear`), each applied per model
while a caller is inside (`patches`)."""
