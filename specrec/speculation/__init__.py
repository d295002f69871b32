"""The speculation engine: the per-request draft -> verify loop and the policies that size each round."""
