"""Surrogate training, attacks, defenses and certificates."""
