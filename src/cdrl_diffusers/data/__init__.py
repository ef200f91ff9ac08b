"""Data that needs no download: 2-D toy distributions and procedural image datasets."""
