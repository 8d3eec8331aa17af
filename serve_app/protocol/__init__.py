"""Data shapes: what clients send and receive (openai, tokenize) and what the ingress and deployments exchange (engine)."""
