"""Validation, defaults and types of the AIFlow API."""
