"""`python -m bench.serve`: a serving benchmark against a running cluster (see __main__.py)."""
