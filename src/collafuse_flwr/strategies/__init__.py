"""Server strategies."""
