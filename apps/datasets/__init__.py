"""Synthetic traffic scenes, dataset splits and loaders for user data; import the submodule you need."""
