"""Pulumi components and the pure modules they are built from (settings, sizing, rendering)."""
