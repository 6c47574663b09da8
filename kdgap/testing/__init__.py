"""kdgap/testing."""
