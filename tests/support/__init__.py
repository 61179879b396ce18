"""Helpers shared by the test suite: certificates, requirements, a private Postfix."""
