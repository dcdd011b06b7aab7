"""Multimodal models: encoders for images, audio and video, and their fusion with a text decoder."""
