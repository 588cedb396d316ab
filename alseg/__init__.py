"""alseg."""
