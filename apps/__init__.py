"""The vision tasks, synthetic datasets and accuracy-aware adapter generation."""
