"""The bottom layer: utilities every other package may import, importing nothing of the project."""
