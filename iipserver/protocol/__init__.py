"""The IIP protocol layer: request strings to commands, commands to responses."""
