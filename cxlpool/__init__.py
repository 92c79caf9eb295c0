"""Beluga-KV."""
