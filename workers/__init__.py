"""Scoring workers: pull chunks of pairs from Redis, score them with a backend, write the scores."""
