"""kdgap/hooks/patch."""
